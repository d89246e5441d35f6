"""``torchkeep verify`` and ``torchkeep scan``: check checkpoints without trusting them."""

from __future__ import annotations

from typing import Annotated

import typer

import torchkeep as tk
from torchkeep.cli._output import (
    emit_json,
    handle_errors,
    print_heading,
    print_line,
    print_table,
)

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    """Add ``verify`` and ``scan`` to the ``torchkeep`` app."""
    app.command("verify")(verify_command)
    app.command("scan")(scan_command)


@handle_errors
def verify_command(
    targets: Annotated[
        list[str], typer.Argument(help="Files, run checkpoints (RUN@<step>|latest|best) or runs.")
    ],
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON for programs.")] = False,
) -> None:
    """Check structure and hashes, reading every tensor; exit 1 if anything is wrong."""
    reports = [tk.verify(t) for t in targets]
    if json_out:
        emit_json([r.to_dict() for r in reports])
    else:
        for r in reports:
            status = "OK" if r.ok else f"{len(r.problems)} problem(s)"
            print_line(
                f"{r.target}: {status} ({r.kind}; {r.checkpoints} checkpoint(s), "
                f"{r.tensors} tensor(s) checked)"
            )
            for problem in r.problems:
                print_line(f"  problem: {problem}")
            for note in r.notes:
                print_line(f"  note: {note}")
    if not all(r.ok for r in reports):
        raise typer.Exit(1)


@handle_errors
def scan_command(
    paths: Annotated[
        list[str], typer.Argument(help="Files to scan (.pt/.pth/.bin/.ckpt/.tar...).")
    ],
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON for programs.")] = False,
) -> None:
    """List the globals pickle-based files would import, never executing them; exit 1 if unsafe.

    A global is dangerous when torch's weights_only unpickler would refuse it: loading such a
    file needs trust=True, i.e. running code from it.
    """
    scans = [tk.scan(p) for p in paths]
    if json_out:
        emit_json([s.to_dict() for s in scans])
    else:
        for s in scans:
            verdict = "safe" if s.is_safe else f"UNSAFE: {len(s.unsafe)} dangerous global(s)"
            print_heading(f"{s.path}: {verdict}")
            if not s.records:
                print_line("  no pickle inside: nothing can run on load")
                continue
            rows = [[g, "DANGEROUS" if g in s.unsafe else "allowed"] for g in s.globals]
            rows += [[g, "DANGEROUS"] for g in s.unsafe if g not in s.globals]
            print_table(["global", "verdict"], rows)
    if not all(s.is_safe for s in scans):
        raise typer.Exit(1)
