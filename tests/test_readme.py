"""The README's Python examples run, in order, as one script in a fresh process."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3, "the README lost its examples"
    script = tmp_path / "readme_examples.py"
    script.write_text("\n".join(blocks))
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "LoadReport: 4 loaded, 0 missing, 0 unexpected, 0 mismatched" in result.stdout
    assert (tmp_path / "ckpt.safetensors").is_file() and (tmp_path / "net").is_dir()
