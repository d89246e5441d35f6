"""``torchkeep diff`` and ``torchkeep convert``: compare two checkpoints, rewrite one."""

from __future__ import annotations

from typing import Annotated

import torch
import typer

import torchkeep as tk
from torchkeep.cli._errors import fail, handle_errors
from torchkeep.cli._output import (
    Column,
    emit_json,
    format_shape,
    human_bytes,
    print_line,
    print_table,
)

__all__ = ["DTYPES", "register"]

#: Names accepted by ``--dtype``.
DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "fp64": torch.float64,
    "float64": torch.float64,
}


def register(app: typer.Typer) -> None:
    """Add ``diff`` and ``convert`` to the ``torchkeep`` app."""
    app.command("diff")(diff_command)
    app.command("convert")(convert_command)


@handle_errors
def diff_command(
    a: Annotated[str, typer.Argument(help="First checkpoint: a file or RUN@latest|best|<step>.")],
    b: Annotated[str, typer.Argument(help="Second checkpoint.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON for programs.")] = False,
    show_identical: Annotated[
        bool, typer.Option("--identical", help="Also list the tensors that are equal.")
    ] = False,
) -> None:
    """Compare two checkpoints tensor by tensor: added, removed, changed, identical.

    Exits 0 when they hold the same tensors bit for bit, 1 when they differ.
    """
    report = tk.diff(a, b)
    if json_out:
        emit_json(report.to_dict())
    else:
        rows: list[list[object]] = [[k, "added", None, None, None] for k in report.added]
        rows += [[k, "removed", None, None, None] for k in report.removed]
        for c in report.changed:
            shapes = (
                format_shape(c.shape[0])
                if c.shape[0] == c.shape[1]
                else f"{format_shape(c.shape[0])} -> {format_shape(c.shape[1])}"
            )
            dtypes = c.dtype[0] if c.dtype[0] == c.dtype[1] else f"{c.dtype[0]} -> {c.dtype[1]}"
            diff = None if c.max_abs_diff is None else f"{c.max_abs_diff:.6g}"
            rows.append([c.key, "changed", dtypes, shapes, diff])
        if show_identical:
            rows += [[k, "identical", None, None, "0"] for k in report.identical]
        if rows:
            columns: list[Column | str] = ["key", "change", "dtype", "shape"]
            columns.append(Column("max abs diff", "right"))
            print_table(columns, rows, title=f"{a}  vs  {b}")
        print_line(report.summary)
    if not report.same:
        raise typer.Exit(1)


def _rename_rules(items: list[str]) -> dict[str, str]:
    rules: dict[str, str] = {}
    for item in items:
        pattern, sep, replacement = item.partition("=")
        if not sep or not pattern:
            fail(f"--rename takes PATTERN=REPLACEMENT, got {item!r}", code=2)
        rules[pattern] = replacement
    return rules


@handle_errors
def convert_command(
    src: Annotated[str, typer.Argument(help="The checkpoint to convert (read safely).")],
    dst: Annotated[str, typer.Argument(help="Output: .safetensors, or .pt/.pth/.bin/.ckpt/.tar.")],
    strip_prefix: Annotated[
        str | None,
        typer.Option("--strip-prefix", help="Remove this prefix from keys, e.g. module."),
    ] = None,
    rename: Annotated[
        list[str] | None,
        typer.Option(
            "--rename", help="PATTERN=REPLACEMENT regex rule on keys; repeatable, in order."
        ),
    ] = None,
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="Cast floating tensors: bf16, fp16, fp32, fp64.")
    ] = None,
    only: Annotated[
        list[str] | None, typer.Option("--only", help="Keep keys matching this glob; repeatable.")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON for programs.")] = False,
) -> None:
    """Convert a checkpoint between formats, optionally renaming, filtering or casting tensors.

    Without --strip-prefix/--rename/--only the whole checkpoint is kept; with them, its state
    dict is written alone.
    """
    cast = None
    if dtype is not None:
        cast = DTYPES.get(dtype.lower())
        if cast is None:
            fail(f"unknown --dtype {dtype!r}; use one of {', '.join(sorted(DTYPES))}", code=2)
    info = tk.convert(
        src,
        dst,
        strip_prefix=strip_prefix,
        rename=_rename_rules(rename or []),
        dtype=cast,
        only=only or None,
    )
    if json_out:
        emit_json(info.to_dict())
        return
    print_line(
        f"wrote {info.path} ({info.format}): {len(info.tensors)} tensors, "
        f"{human_bytes(info.total_bytes)} of tensor data"
    )
