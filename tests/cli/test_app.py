"""The ``torchkeep`` app: entry point, ``--version``, ``--help``."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

import torchkeep as tk
from torchkeep.cli import app

from ._helpers import run_torchkeep

COMMANDS = ("inspect", "diff", "convert", "verify", "scan", "export", "ls", "prune", "plot", "demo")


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
