"""The ``torchkeep`` command: a thin typer + rich layer over the public API.

One module per command group, each with a ``register(app)`` function; adding a group is one
line in :data:`_COMMANDS`. Commands call only ``torchkeep``'s public names and print through
:mod:`torchkeep.cli._output`, which also turns torchkeep's errors into ``ErrorName: message``
and exit code 1.
"""

from __future__ import annotations

import platform
from typing import Annotated

import torch
import typer

import torchkeep as tk
from torchkeep.cli import _compare, _demo, _export, _inspect, _integrity, _plot, _run
from torchkeep.cli._help import Group, tidy_help
from torchkeep.cli._output import print_line

__all__ = ["app", "main"]

app = typer.Typer(
    name="torchkeep",
    help=(
        "Safe, exact and fast checkpoints for PyTorch: inspect files; list, prune and plot "
        "runs; export models to ONNX, .pt2 or TorchScript, verified."
    ),
    no_args_is_help=True,
    cls=Group,  # help paragraphs wrapped once, flags without "<bool>" (see _help.py)
    # A checkpoint tool's locals are tensors and state dicts: never dump them in a traceback.
    pretty_exceptions_show_locals=False,
)


def _version_callback(value: bool) -> None:
    if value:
        python = platform.python_version()
        print_line(f"torchkeep {tk.__version__} (torch {torch.__version__}, Python {python})")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Print the versions of torchkeep, torch and Python, and exit.",
            callback=_version_callback,
            is_eager=True,
        ),
    ] = False,
) -> None:
    """Safe, exact and fast checkpoints for PyTorch."""


# Each module registers its command(s); the order is the order of `torchkeep --help`.
_COMMANDS = (
    _inspect,
    _compare,
    _integrity,
    _export,
    _run,
    _plot,
    _demo,
)
for _module in _COMMANDS:
    _module.register(app)
tidy_help(app)


def main() -> None:
    """Entry point of the ``torchkeep`` console script."""
    app(prog_name="torchkeep")
