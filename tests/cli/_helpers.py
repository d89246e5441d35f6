"""Helpers of the CLI tests: running the installed command, and what output must not contain."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torchkeep as tk

#: Variables that make rich treat a pipe as a terminal; tests choose the mode themselves.
TERMINAL_ENV = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "NO_COLOR", "COLUMNS")

ANSI = re.compile(r"\x1b\[")
#: Unicode box drawing and block elements (rich's table borders and progress bars).
BOX = re.compile(r"[\u2500-\u259f]")


def torchkeep_command() -> list[str]:
    """The installed ``torchkeep`` console script, or the same entry point through Python."""
    script = Path(sys.executable).parent / "torchkeep"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    found = shutil.which("torchkeep")
    if found:
        return [found]
    return [sys.executable, "-c", "from torchkeep.cli import main; main()"]


def run_torchkeep(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``torchkeep ARGS`` in a subprocess, stdout and stderr piped, as a script would."""
    env = {k: v for k, v in os.environ.items() if k not in TERMINAL_ENV}
    return subprocess.run(
        [*torchkeep_command(), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
        check=False,
    )


def error_names() -> set[str]:
    """The class names of ``TorchkeepError`` and all its subclasses."""
    names: set[str] = set()
    todo: list[type] = [tk.TorchkeepError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


def assert_clean_error(stderr: str, expected: str | None = None) -> None:
    """``stderr`` is one ``ErrorName: message`` report, without a traceback."""
    name = stderr.split(":", 1)[0]
    assert name in error_names(), stderr
    if expected is not None:
        assert name == expected, stderr
    assert "Traceback" not in stderr
    assert not ANSI.search(stderr)
