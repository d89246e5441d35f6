"""A single process reads a 64 MiB sharded (FSDP2, 2 ranks) checkpoint whole at about one copy
of the weights: each chunk is hashed and copied from its mapped pack, then its pages dropped.

Peak memory is measured in a fresh process: VmHWM (the resident high-water mark, reset to the
current RSS first where /proc/self/clear_refs allows) before and after.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torchkeep as tk
from tests.distributed._fsdp_workers import BIG_MIB
from tests.distributed._launch import launch

WORKERS = Path(__file__).with_name("_fsdp_workers.py")
pytestmark = pytest.mark.slow

_MEASURE = """
import sys
import torch, torchkeep as tk

def hwm():
    try:  # "5" resets the high-water mark to the current RSS (imports peak above it)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))


def peak():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))

what, run, target = sys.argv[1:4]
before = hwm()
if what == "load":
    state = tk.load(run + "@latest")
    assert len(state["model"]) == 4
elif what == "load_into":
    model = torch.nn.Sequential(*(torch.nn.Linear(2048, 2048, bias=False) for _ in range(4)))
    before = hwm()  # the model's own memory is not the load's
    tk.load_into(model, run + "@latest")
else:
    tk.convert(run + "@latest", target)
print((peak() - before) / 1024)
"""


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("big")
    launch("big2", out, 2, workers=WORKERS)
    return out


def _peak_mib(what: str, run: Path, target: Path) -> float:
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, what, str(run), str(target)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    return float(done.stdout.split()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
@pytest.mark.parametrize("what", ["load", "load_into", "convert"])
def test_single_process_read_of_shards_peaks_near_one_copy(big: Path, what: str) -> None:
    target = big / f"{what}.safetensors"
    grown = _peak_mib(what, big / "big", target)
    # before: two copies for load (the shards' pages stayed mapped), three for convert
    assert grown <= 1.3 * BIG_MIB, f"{what} grew the peak by {grown:.1f} MiB"
    if what == "convert":  # the file holds every tensor, equal to the checkpoint's
        written, saved = tk.load(target)["model"], tk.load(f"{big / 'big'}@latest")["model"]
        assert written.keys() == saved.keys() and len(saved) == 4
        assert all(torch.equal(written[k], saved[k]) for k in saved)
