"""examples/ddp_resume.py runs as a user would run it: two processes train, one resumes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ddp_resume.py"


@pytest.mark.slow
def test_ddp_resume_example(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "2 ranks trained steps 0..3" in result.stdout
    assert "resumed at step 3 with 1 process (saved by 2 ranks)" in result.stdout
    assert "weights equal to the checkpoint's: yes" in result.stdout
    assert "verify: OK" in result.stdout
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "0000000002.json",
        "0000000003.json",
    ]  # keep_last=2: retention ran on rank 0's commits
