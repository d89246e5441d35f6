"""``torchkeep inspect``: what a checkpoint holds, read without loading its tensors.

:func:`render_info` is the human rendering of a :class:`~torchkeep.CheckpointInfo`; other
commands (``demo``, later ``ls`` and ``diff``) reuse it.
"""

from __future__ import annotations

from typing import Annotated

import typer

import torchkeep as tk
from torchkeep.cli._errors import handle_errors
from torchkeep.cli._output import (
    Column,
    compact_json,
    emit_json,
    format_shape,
    human_bytes,
    is_terminal,
    print_kv,
    print_line,
    print_table,
)

__all__ = ["TERMINAL_LIMIT", "inspect_command", "register", "render_info"]

#: Tensor rows shown on a terminal when ``--limit`` is not given (piped output shows all).
TERMINAL_LIMIT = 200


def register(app: typer.Typer) -> None:
    """Add ``inspect`` to the ``torchkeep`` app."""
    app.command("inspect")(inspect_command)


def _size(n: int) -> str:
    return f"{human_bytes(n)} ({n:,} bytes)" if n >= 1024 else human_bytes(n)


def render_info(info: tk.CheckpointInfo, *, limit: int | None = None) -> None:
    """Print a checkpoint's summary, tensor table, totals, shared tensors, values and metadata.

    Args:
        info: what :func:`torchkeep.inspect` returned.
        limit: show at most this many tensor rows, then a ``... N more tensors`` line;
            ``None`` or ``0`` shows every row.
    """
    print_kv(
        [
            ("path", info.path),
            ("format", info.format),
            ("format version", info.format_version),
            ("file size", _size(info.file_bytes)),
        ]
    )

    if info.files:  # a checkpoint directory: one row per file, tensors only counted
        _render_files(info)
        return
    tensors = info.tensors
    shown = tensors[:limit] if limit else tensors
    print_line()
    if tensors:
        print_table(
            [
                Column("name"),
                Column("dtype"),
                Column("shape"),
                Column("size", justify="right"),
                Column("shared with"),
            ],
            [
                (t.name, t.dtype, format_shape(t.shape), human_bytes(t.nbytes), t.shared_with)
                for t in shown
            ],
            title="tensors",
        )
        hidden = len(tensors) - len(shown)
        if hidden:
            print_line(f"... {hidden:,} more tensors (--limit 0 shows all, --json lists all)")
    else:
        print_line("tensors: none")

    shared = info.shared
    count, data = f"{len(tensors):,}", _size(info.total_bytes)
    if shared:
        count += f" ({len(shared):,} sharing storage)"
        data += " (shared storage counted once)"
    print_line()
    print_kv(
        [("tensors", count), ("parameters", f"{info.num_params:,}"), ("tensor data", data)],
        title="totals",
    )

    if shared:
        print_line()
        print_table(
            ["name", "shares storage with"],
            sorted(shared.items()),
            title="shared tensors",
        )

    print_line()
    if info.values:
        print_table(
            ["key", "value"],
            [(k, compact_json(v)) for k, v in info.values.items()],
            title="values",
        )
    else:
        print_line("values: none")

    print_line()
    if info.metadata:
        print_table(
            ["key", "value"],
            [(str(k), compact_json(v)) for k, v in info.metadata.items()],
            title="metadata",
        )
    else:
        print_line("metadata: none")


def _render_files(info: tk.CheckpointInfo) -> None:
    """The files of a checkpoint directory: kind, format, size, and what each holds."""
    print_line()
    print_table(
        [
            Column("file"),
            Column("kind"),
            Column("format"),
            Column("size", justify="right"),
            Column("tensors", justify="right"),
            Column("holds"),
        ],
        [
            (
                f.name,
                f.kind,
                f.format,
                human_bytes(f.file_bytes),
                f"{f.tensors:,}" if f.kind == "checkpoint" and f.problem is None else None,
                f.problem or f.summary,
            )
            for f in info.files
        ],
        title="files",
    )
    print_line()
    print_kv(
        [
            ("files", f"{len(info.files):,}"),
            ("tensors", f"{len(info.tensors):,}"),
            ("parameters", f"{info.num_params:,}"),
            ("tensor data", _size(info.total_bytes)),
        ],
        title="totals",
    )
    print_line()
    print_line(
        "tensors of one file: torchkeep inspect DIR/FILE; --json lists every tensor as FILE/NAME"
    )


@handle_errors
def inspect_command(
    path: Annotated[
        str,
        typer.Argument(
            metavar="PATH",
            help="Checkpoint file or directory (torchkeep, safetensors, torch .pt/.pth/.tar...).",
            show_default=False,
        ),
    ],
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print CheckpointInfo.to_dict() as JSON, and nothing else, on stdout.",
        ),
    ] = False,
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit",
            "-n",
            min=0,
            metavar="N",
            show_default=False,
            help=(
                f"Show at most N tensor rows, then a '... N more' line; 0 shows all. "
                f"Default: all when piped, {TERMINAL_LIMIT} on a terminal. Ignored with --json."
            ),
        ),
    ] = None,
) -> None:
    """Show a checkpoint's format, tensors, shared storage and metadata.

    Reads only the file's header and index, never its tensor data, so it is fast on large
    files and never runs code from a pickle. A checkpoint directory (a Trainer checkpoint-N/,
    Accelerate state) is shown file by file: format, size, what each holds; side files such
    as trainer_state.json as side files, pickles that need unsafe globals as unsafe. Exits with 1 when the file is missing, corrupt
    or not a checkpoint.
    """
    info = tk.inspect(path)
    if as_json:
        emit_json(info.to_dict())
        return
    if limit is None:
        limit = TERMINAL_LIMIT if is_terminal() else 0
    render_info(info, limit=limit)
