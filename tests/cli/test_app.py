"""The ``torchkeep`` app: entry point, ``--version``, ``--help``."""

from __future__ import annotations

import itertools

import pytest
import torch
from typer.testing import CliRunner

import torchkeep as tk
from torchkeep.cli import app

from ._helpers import run_torchkeep

COMMANDS = (
    "inspect",
    "diff",
    "convert",
    "verify",
    "scan",
    "export",
    "ls",
    "prune",
    "plot",
    "registry",
    "demo",
)


def test_version(runner: CliRunner) -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.startswith(f"torchkeep {tk.__version__} (torch {torch.__version__}, ")


def test_help_lists_the_commands(runner: CliRunner) -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.stdout


def test_no_arguments_shows_help(runner: CliRunner) -> None:
    result = runner.invoke(app, [])
    assert "Usage" in result.output
    assert "inspect" in result.output


def test_command_help(runner: CliRunner) -> None:
    for name in COMMANDS:
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0, name
        assert "Usage" in result.stdout


def test_unknown_command_is_a_usage_error(runner: CliRunner) -> None:
    assert runner.invoke(app, ["frobnicate"]).exit_code == 2


def test_console_script() -> None:
    version = run_torchkeep("--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith(f"torchkeep {tk.__version__} ")
    helped = run_torchkeep("--help")
    assert helped.returncode == 0, helped.stderr
    for name in COMMANDS:
        assert name in helped.stdout


def _description(help_text: str) -> list[str]:
    """The lines of a command's help between its usage line and its first panel."""
    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines) if "Usage:" in line) + 1
    end = next(i for i, line in enumerate(lines) if line.lstrip().startswith("\u256d"))
    return lines[start:end]


@pytest.mark.parametrize("columns", [80, 120])
def test_help_paragraphs_are_wrapped_once(runner: CliRunner, columns: int) -> None:
    # Hard-wrapped docstrings re-wrapped by rich gave a long line and a stub ("on large")
    # for every source line. Wrapped once, a line breaks only where the next word does not fit.
    for name in ("", *COMMANDS):
        args = [name, "--help"] if name else ["--help"]
        result = runner.invoke(app, args, env={"COLUMNS": str(columns)})
        assert result.exit_code == 0, name
        lines = [line.rstrip() for line in _description(result.stdout)]
        assert any(lines), name
        for line, after in itertools.pairwise(lines):
            if not line or not after or after.lstrip().startswith(("-", "*")):
                continue
            first_word = after.split()[0]
            assert len(line) + 1 + len(first_word) > columns - 4, (name, line, after)


def test_flags_show_no_bool_metavar(runner: CliRunner) -> None:
    for name in ("", *COMMANDS):
        args = [name, "--help"] if name else ["--help"]
        out = runner.invoke(app, args, env={"COLUMNS": "200"}).stdout
        assert "<bool>" not in out and "BOOLEAN" not in out, name
        assert "--help" in out
    inspect_help = runner.invoke(app, ["inspect", "--help"], env={"COLUMNS": "200"}).stdout
    assert "N [x>=0]" in inspect_help  # options that take a value keep theirs


def test_errors_name_message_hint_exit_1_and_usage_errors_exit_2(runner: CliRunner) -> None:
    # The contract the README states, on real commands; a URL no store serves is refused, never
    # made a folder.
    for args in (
        ["inspect", "nosuch://bucket/model.safetensors"],
        ["ls", "nosuch://bucket/runs"],
        ["convert", "nosuch://bucket/a.pt", "b.safetensors"],
        ["export", "nosuch://bucket/model", "-o", "m.pt2", "--example-shape", "1,4"],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (args, result.output)
        assert result.stdout == ""
        first, hint = result.stderr.splitlines()
        assert first.startswith(f"StorageError: {args[1]}: no storage for nosuch://"), args
        assert hint.startswith("  hint: pip install 'torchkeep[remote]'"), args
    for args in (["inspect"], ["inspect", "--nope", "x"], ["inspect", "x", "--limit", "-1"]):
        assert runner.invoke(app, args).exit_code == 2, args
