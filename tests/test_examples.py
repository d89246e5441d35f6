"""The examples run as users would run them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_finetune_example(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "finetune.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "stripped prefix 'module.'" in result.stdout
    assert "2 mismatched" in result.stdout
    assert "predictions identical: yes" in result.stdout
    assert (tmp_path / "ft.safetensors").is_file()
