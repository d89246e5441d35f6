"""A bounded atheris (libFuzzer) run over the decoders, seals recomputed (see atheris_decoders.py).

Coverage-guided, so it reaches what the hypothesis fuzzers' fixed mutations miss: spliced JSON
text, several values changed at once. It runs in a subprocess: a crash there is a finding, not
the end of the test session. ``TORCHKEEP_ATHERIS_SECONDS`` lengthens it for a long run.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import atheris  # noqa: F401  # a dev dependency: missing is a broken install, not a skip
import pytest

import torchkeep

ROOT = Path(__file__).resolve().parents[2]
SECONDS = int(os.environ.get("TORCHKEEP_ATHERIS_SECONDS", "20"))


@pytest.mark.slow
def test_atheris_finds_no_foreign_exception_in_the_decoders(tmp_path: Path) -> None:
    src = Path(torchkeep.__file__).resolve().parents[1]  # the torchkeep under test
    env = {
        **os.environ,
        "PYTHONPATH": f"{src}{os.pathsep}{ROOT}",
        "TORCHKEEP_ATHERIS_WORK": str(tmp_path),
    }
    # A seed corpus of random inputs: libFuzzer alone starts from one empty input and grows it
    # slowly, so that its first minutes mutate one value at most.
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    for i in range(200):
        (corpus / f"seed{i}").write_bytes(rng.randbytes(rng.randrange(16, 512)))
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "hostile" / "atheris_decoders.py"),
            f"-max_total_time={SECONDS}",
            "-atheris_runs=200000",
            "-max_len=512",
            "-len_control=0",  # long inputs from the start: more values mutated per run
            "-seed=2",  # reproducible in CI; a long run by hand picks its own
            f"-artifact_prefix={tmp_path}/",
            str(corpus),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=SECONDS + 120,
        check=False,
    )
    output = done.stdout + done.stderr
    finding = output[output.find("Uncaught Python exception") :][:4000]
    assert done.returncode == 0, f"atheris found a crash (rc {done.returncode}):\n{finding}"
    runs = re.search(r"Done (\d+) runs", output)
    assert runs is not None and int(runs[1]) > 100, output[-2000:]
    assert not list(tmp_path.glob("crash-*"))
