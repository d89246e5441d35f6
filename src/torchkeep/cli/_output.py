"""Output helpers shared by every command: tables, JSON and sizes.

Every command prints through these helpers so that the whole CLI behaves alike:

- On a terminal (as rich detects one: a tty, or ``FORCE_COLOR`` / ``TTY_COMPATIBLE=1`` set),
  tables are rich tables. Piped, they are plain text columns separated by two spaces, with no
  box-drawing characters and no colour codes, so that ``grep``, ``awk`` and ``cut`` work on them.
- ``--json`` prints one JSON document and nothing else on stdout.

Errors are reported by :mod:`torchkeep.cli._errors`.

The consoles are created per call, never at import, so that they write to whatever
``sys.stdout`` is at that moment (a test runner swaps it).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Literal

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

__all__ = [
    "Column",
    "compact_json",
    "emit_json",
    "format_shape",
    "human_bytes",
    "is_terminal",
    "json_default",
    "print_heading",
    "print_kv",
    "print_line",
    "print_table",
    "stderr_console",
    "stdout_console",
]

_PLACEHOLDER = "-"


# ---------------------------------------------------------------------------------------------
# consoles


def stdout_console() -> Console:
    """A rich console on the current ``sys.stdout`` (no markup or number highlighting)."""
    return Console(file=sys.stdout, highlight=False)


def stderr_console() -> Console:
    """A rich console on the current ``sys.stderr``; long messages are not wrapped."""
    return Console(file=sys.stderr, highlight=False, soft_wrap=True)


def is_terminal() -> bool:
    """True when stdout is a terminal (rich's detection, which honours ``FORCE_COLOR``)."""
    return stdout_console().is_terminal


# ---------------------------------------------------------------------------------------------
# text


@dataclass(frozen=True, slots=True)
class Column:
    """A table column.

    Attributes:
        header: the column's title.
        justify: ``"right"`` for numbers, ``"left"`` otherwise.
    """

    header: str
    justify: Literal["left", "right"] = "left"


def _cell(value: object) -> str:
    if value is None:
        return _PLACEHOLDER
    return str(value)


def print_line(text: str = "") -> None:
    """Print one line as it is (no rich markup is interpreted)."""
    sys.stdout.write(text + "\n")


def print_heading(text: str) -> None:
    """Print a section heading: bold on a terminal, a plain line when piped."""
    if is_terminal():
        stdout_console().print(Text(text, style="bold"))
    else:
        print_line(text)


def print_table(
    columns: Sequence[Column | str],
    rows: Iterable[Sequence[object]],
    *,
    title: str | None = None,
) -> None:
    """Print a table: a rich table on a terminal, plain aligned columns when piped.

    Args:
        columns: the columns, as :class:`Column` or just a header (left-justified).
        rows: one sequence of cells per row; ``None`` cells print as ``-``.
        title: a line printed above the table.
    """
    cols = [c if isinstance(c, Column) else Column(c) for c in columns]
    cells = [[_cell(v) for v in row] for row in rows]
    if is_terminal():
        table = Table(
            title=title,
            title_justify="left",
            box=box.SIMPLE_HEAD,
            show_edge=False,
            pad_edge=False,
            header_style="bold",
        )
        for col in cols:
            table.add_column(col.header, justify=col.justify, overflow="fold")
        for row in cells:
            table.add_row(*(Text(c) for c in row))
        stdout_console().print(table)
        return
    if title:
        print_line(title)
    header = [c.header for c in cols]
    widths = [max(len(r[i]) for r in [header, *cells]) for i in range(len(cols))]
    for row in [header, *cells]:
        parts = [
            c.rjust(w) if col.justify == "right" else c.ljust(w)
            for c, w, col in zip(row, widths, cols, strict=True)
        ]
        print_line("  ".join(parts).rstrip())


def print_kv(pairs: Sequence[tuple[str, object]], *, title: str | None = None) -> None:
    """Print ``key  value`` lines, keys aligned (a borderless grid on a terminal).

    Args:
        pairs: the keys and values, in order; ``None`` values print as ``-``.
        title: a heading printed above the lines.
    """
    if title:
        print_heading(title)
    if is_terminal():
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column(overflow="fold")
        for key, value in pairs:
            grid.add_row(Text(key), Text(_cell(value)))
        stdout_console().print(grid)
        return
    width = max((len(k) for k, _ in pairs), default=0)
    for key, value in pairs:
        print_line(f"{key.ljust(width)}  {_cell(value)}".rstrip())


def human_bytes(n: int | float) -> str:
    """A byte count in binary units, e.g. ``"512 B"``, ``"1.2 MiB"``.

    Args:
        n: the number of bytes.

    Returns:
        The size with one decimal above 1 KiB.
    """
    if n < 1024:
        return f"{int(n)} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            break
    return f"{value:.1f} {unit}"


def format_shape(shape: Sequence[int]) -> str:
    """A shape as ``"(3, 4)"``; a scalar is ``"()"``."""
    return "(" + ", ".join(str(s) for s in shape) + ")"


def compact_json(value: object) -> str:
    """A value on one line: strings as they are, anything else as compact JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), default=json_default)


# ---------------------------------------------------------------------------------------------
# JSON


def json_default(obj: object) -> Any:
    """``json.dumps`` fallback for the values commands report.

    Handles objects with ``to_dict()`` (every torchkeep report), dataclasses, paths, sets,
    datetimes, bytes (as hex), and numpy / torch scalars (``.item()``).

    Raises:
        TypeError: for anything else, as ``json.dumps`` would.
    """
    to_dict = getattr(obj, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, set | frozenset):
        return sorted(obj, key=str)
    if isinstance(obj, _dt.datetime | _dt.date):
        return obj.isoformat()
    item = getattr(obj, "item", None)
    if callable(item):
        return item()
    if isinstance(obj, bytes):
        return obj.hex()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _jsonable(obj: Any) -> Any:
    # Converted up front rather than through `json.dumps(default=...)`, so that values produced
    # by `json_default` (a report's `to_dict()`) are converted all the way down too.
    if isinstance(obj, float) and not math.isfinite(obj):
        # NaN and infinity are not JSON: `jq` and most parsers reject them. Report them as text.
        return str(obj)
    if obj is None or isinstance(obj, str | int | float):
        return obj
    if isinstance(obj, Mapping):
        return {
            k if isinstance(k, str | int | float | bool) else str(k): _jsonable(v)
            for k, v in obj.items()
        }
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return _jsonable(json_default(obj))


def emit_json(obj: object) -> None:
    """Print ``obj`` as one JSON document (indent 2, keys in their order) and a newline.

    Args:
        obj: a JSON-able value; see :func:`json_default` for what else is accepted. NaN and
            infinities are written as the strings ``"nan"``, ``"inf"``, ``"-inf"``.

    Raises:
        TypeError: for a value :func:`json_default` does not handle.
    """
    sys.stdout.write(json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n")
