"""How ``--help`` reads: paragraphs wrapped once, flags without a type.

Docstrings are hard-wrapped at 100 columns in the source. typer's rich help joins the lines of
a command's first paragraph but keeps the line breaks of the others, and rich then wraps those
lines again to the terminal: at 80 columns every source line became a long line plus a stub of
two words. :func:`unwrap` joins the lines of each paragraph (list items keep their own line), so
that rich wraps each paragraph once, to whatever width the terminal has.

typer shows every option's type, which for a flag (``--json``, ``--dry-run``, ``--help``) is a
meaningless ``<bool>``: a flag takes no value. :class:`Command` and :class:`Group` give flags an
empty metavar. The app uses them for itself and every command (see ``tidy_help``), so a new
command gets both without doing anything.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

__all__ = ["Command", "Group", "tidy_help", "unwrap"]

_LIST_ITEM = re.compile(r"^([-*\u2022]|\d+[.)])\s")
_BLANK_LINE = re.compile(r"\n[ \t]*\n")


def unwrap(text: str | None) -> str | None:
    """Join the hard-wrapped lines of each paragraph of a docstring.

    Paragraphs are separated by blank lines. A line that starts a list item (``-``, ``*``,
    ``1.``) starts a new line; a paragraph starting with ``\\b`` (click's "do not rewrap" mark)
    is kept as it is, and so is everything after ``\\f`` (click's "end of help" mark).

    Args:
        text: a docstring, indented or not.

    Returns:
        The text, dedented, one line per paragraph or list item; ``None`` stays ``None``.
    """
    if not text:
        return text
    head, mark, tail = inspect.cleandoc(text).partition("\f")
    paragraphs = []
    for paragraph in _BLANK_LINE.split(head.strip("\n")):
        if paragraph.startswith("\b"):
            paragraphs.append(paragraph)
            continue
        lines: list[str] = []
        for line in paragraph.splitlines():
            line = line.strip()
            if lines and not _LIST_ITEM.match(line):
                lines[-1] = f"{lines[-1]} {line}"
            else:
                lines.append(line)
        paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs) + mark + tail


def _no_flag_type(param: Any) -> None:
    if getattr(param, "is_flag", False) and getattr(param, "metavar", None) is None:
        param.metavar = ""  # typer then shows no type: a flag takes no value


class _Tidy:
    """Mixin for typer's command classes: help unwrapped once, flags without a metavar."""

    help: str | None

    def _tidy(self) -> None:
        self.help = unwrap(self.help)

    def get_params(self, ctx: Any) -> list[Any]:
        # Every parameter help shows, including --help and the completion options typer adds.
        params: list[Any] = super().get_params(ctx)  # type: ignore[misc]  # typer stubs type get_params loosely
        for param in params:
            _no_flag_type(param)
        return params


class Command(_Tidy, TyperCommand):
    """A typer command whose help is wrapped once and whose flags show no ``<bool>``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tidy()


class Group(_Tidy, TyperGroup):
    """The app's group, with the same help conventions as :class:`Command`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tidy()


def tidy_help(app: typer.Typer) -> None:
    """Make every command registered on ``app`` so far use :class:`Command`.

    Args:
        app: the app; its own class should be :class:`Group` (``typer.Typer(cls=Group)``).
    """
    for info in app.registered_commands:
        if info.cls in (None, TyperCommand):  # typer's default; a command's own class is kept
            info.cls = Command
