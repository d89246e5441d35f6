"""The ``torchkeep`` command: a thin typer + rich layer over the public API.

One module per command group, each with a ``register(app)`` function; adding a group is one
line in :data:`_COMMANDS`. Commands call only ``torchkeep``'s public names and print through
:mod:`torchkeep.cli._output`; :mod:`torchkeep.cli._errors` turns torchkeep's errors into
``ErrorName: message`` and exit code 1 (usage errors: 2).
"""

from __future__ import annotations

import platform
import sys
from typing import Annotated

import torch
import typer
from typer.exceptions import TyperException

import torchkeep as tk
from torchkeep.cli import _compare, _demo, _export, _inspect, _integrity, _plot, _registry, _run
from torchkeep.cli._help import Group, tidy_help
from torchkeep.cli._output import emit_json, print_line
from torchkeep.cli._transfers import transfer_bars

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
    _registry,
    _demo,
)
for _module in _COMMANDS:
    _module.register(app)
tidy_help(app)


def main() -> None:
    """Entry point of the ``torchkeep`` console script.

    Usage errors (an unknown option, a missing argument) exit with status 2; under ``--json``
    they also print their JSON document on stdout, as every other failure does.
    """
    if "--json" not in sys.argv[1:]:
        with transfer_bars():  # remote uploads and downloads over a second get a progress bar
            app(prog_name="torchkeep")
        return
    try:
        code = app(prog_name="torchkeep", standalone_mode=False)
    except TyperException as exc:  # click's errors, as typer vendors them
        exit_code = getattr(exc, "exit_code", 1)
        ctx = getattr(exc, "ctx", None)
        command = ctx.command_path if ctx is not None else "torchkeep"
        emit_json(
            {
                "error": "UsageError" if exit_code == 2 else type(exc).__name__,
                "message": exc.format_message() if hasattr(exc, "format_message") else str(exc),
                "hint": f"see {command} --help",
                "path": None,
                "key": None,
            }
        )
        if hasattr(exc, "show"):
            exc.show()
        sys.exit(exit_code)
    except typer.Abort:
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
