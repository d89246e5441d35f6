"""``torchkeep verify`` and ``torchkeep scan``: check checkpoints without trusting them."""

from __future__ import annotations

from typing import Annotated

import typer

import torchkeep as tk
from torchkeep.cli._errors import handle_errors
from torchkeep.cli._output import emit_json, print_heading, print_line, print_table

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    """Add ``verify`` and ``scan`` to the ``torchkeep`` app."""
    app.command("verify")(verify_command)
    app.command("scan")(scan_command)


def _counts(tensors: int, hashed: int, structural: int, damaged: int, check: str | None) -> str:
    against = "the zip's CRC-32" if check == "crc32" else "stored hashes"
    parts = [f"{hashed} against {against}", f"{structural} structure only"]
    if damaged:
        parts.append(f"{damaged} damaged")
    return f"{tensors} tensor(s) checked: {', '.join(parts)}"


def _verdict(ok: bool, problems: int, tensors: int, hashed: int, structural: int) -> str:
    """Never a bare OK for tensors that had no checksum to be checked against."""
    if not ok:
        return f"{problems} problem(s)"
    if structural and not hashed:
        return "structure OK, no stored hashes to check"
    if structural:
        return f"OK, but {structural} tensor(s) had no stored hash"
    return "OK"


def _file_line(f: tk.FileCheck) -> str:
    if f.status == "side-file":
        return f"{f.path}: side file (JSON), parsed"
    if f.status == "skipped":
        return f"{f.path}: not a checkpoint, not checked"
    if f.status == "unsafe":
        return f"{f.path}: UNSAFE ({f.format}), not loaded"
    verdict = _verdict(f.ok, len(f.problems), f.tensors, f.hashed, f.structural)
    if f.status == "damaged":
        verdict = "DAMAGED"
    if f.tensors or f.check != "crc32":
        detail = _counts(f.tensors, f.hashed, f.structural, f.damaged, f.check)
    else:
        detail = "every zip member checked against its CRC-32"
    return f"{f.path}: {verdict} ({f.format}; {detail})"


@handle_errors
def verify_command(
    targets: Annotated[
        list[str],
        typer.Argument(
            help="Files, checkpoint directories, run checkpoints (RUN@<step>|latest|best) or runs."
        ),
    ],
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON for programs.")] = False,
) -> None:
    """Check structure and hashes, reading every tensor; exit 1 if anything is wrong.

    Says per file how many tensors matched a stored hash (or a zip's CRC-32) and how many
    could only be checked structurally (plain safetensors and legacy torch files store none).
    A checkpoint directory (a Trainer checkpoint-N/) has every file checked; it fails when any
    file is damaged or unsafe to load, naming each.
    """
    reports = [tk.verify(t) for t in targets]
    if json_out:
        emit_json([r.to_dict() for r in reports])
    else:
        for r in reports:
            status = _verdict(r.ok, len(r.problems), r.tensors, r.hashed, r.structural)
            if r.kind == "directory":
                print_line(f"{r.target}: {status} (directory; {len(r.files)} file(s))")
                for f in r.files:
                    print_line(f"  {_file_line(f)}")
                    for problem in f.problems:
                        print_line(f"    problem: {problem}")
            else:
                check = r.files[0].check if len(r.files) == 1 else None
                print_line(
                    f"{r.target}: {status} ({r.kind}; {r.checkpoints} checkpoint(s), "
                    f"{_counts(r.tensors, r.hashed, r.structural, r.damaged, check)})"
                )
                for problem in r.problems:
                    print_line(f"  problem: {problem}")
            for note in r.notes:
                print_line(f"  note: {note}")
    if not all(r.ok for r in reports):
        raise typer.Exit(1)


def _print_scan(s: tk.PickleScan, indent: str = "") -> None:
    verdict = "safe" if s.is_safe else f"UNSAFE: {len(s.unsafe)} dangerous global(s)"
    print_heading(f"{indent}{s.path}: {verdict}")
    if not s.records:
        print_line(f"{indent}  no pickle inside: nothing can run on load")
        return
    rows = [
        [
            g,
            "DANGEROUS"
            if g in s.unsafe
            else "rebuilt by torchkeep"
            if g in s.rebuilt
            else "allowed",
        ]
        for g in s.globals
    ]
    rows += [[g, "DANGEROUS"] for g in s.unsafe if g not in s.globals]
    print_table(["global", "verdict"], rows)


@handle_errors
def scan_command(
    paths: Annotated[
        list[str],
        typer.Argument(help="Files (.pt/.pth/.bin/.ckpt/.tar...) or checkpoint directories."),
    ],
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON for programs.")] = False,
) -> None:
    """List the globals pickle-based files would import, never executing them; exit 1 if unsafe.

    A global is dangerous when torch's weights_only unpickler would refuse it: loading such a
    file needs trust=True, i.e. running code from it. A checkpoint directory (a Trainer
    checkpoint-N/) has every checkpoint file scanned and is unsafe when any file is, or when
    one cannot be parsed; each is named.
    """
    scans = [tk.scan(p) for p in paths]
    if json_out:
        emit_json([s.to_dict() for s in scans])
    else:
        for s in scans:
            if isinstance(s, tk.DirectoryScan):
                bad = [*s.unsafe_files, *(f for f, _ in s.damaged)]
                verdict = "safe" if s.is_safe else f"UNSAFE: {', '.join(bad)}"
                print_heading(f"{s.path}: {verdict} (directory; {len(s.files)} checkpoint file(s))")
                for f in s.files:
                    _print_scan(f, "  ")
                for name, problem in s.damaged:
                    print_line(f"  {name}: DAMAGED, cannot be scanned: {problem}")
                for name in s.skipped:
                    print_line(f"  {name}: not a checkpoint, not scanned")
            else:
                _print_scan(s)
    if not all(s.is_safe for s in scans):
        raise typer.Exit(1)
