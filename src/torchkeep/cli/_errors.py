"""Error reporting shared by every command: ``handle_errors``, ``report_error``, ``fail``.

- A :class:`~torchkeep.TorchkeepError` raised by a command is printed to stderr as
  ``ErrorName: message``, then its hint on a line of its own, without a traceback, and exits
  with code 1; with ``--json``, stdout also gets ``{"error", "message", "hint", "path", "key"}``.
  A missing optional extra (matplotlib, onnx, fsspec) prints the ``pip install`` line that
  fixes it. Usage errors (an unknown option, a missing argument, a bad value) exit with
  typer's code 2. Anything else is a bug in torchkeep and keeps its traceback.
- :func:`fail` ends a command that found a problem itself, in the same words.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import typing
from collections.abc import Callable
from typing import Any, NoReturn, ParamSpec, TypeVar

import typer
from rich.text import Text
from typer.models import OptionInfo

import torchkeep as tk
from torchkeep.cli._output import emit_json, stderr_console

__all__ = [
    "EXTRAS",
    "error_document",
    "fail",
    "handle_errors",
    "report_error",
]

P = ParamSpec("P")
R = TypeVar("R")

#: Top-level module of an optional dependency -> the torchkeep extra that installs it.
EXTRAS: dict[str, str] = {
    "matplotlib": "plot",
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "onnxscript": "onnx",
    "fsspec": "remote",
    "s3fs": "remote",
    "gcsfs": "remote",
}


def _missing_extra(err: ImportError) -> str | None:
    name = err.name or ""
    return EXTRAS.get(name.split(".")[0])


#: True while a command that was given ``--json`` runs (set by :func:`handle_errors`).
_JSON_OUTPUT: contextvars.ContextVar[bool] = contextvars.ContextVar("json_output", default=False)


def error_document(err: BaseException, *, hint: str | None = None) -> dict[str, Any]:
    """What ``--json`` prints for a failure: ``{"error": "ErrorName", "message", "hint", ...}``.

    Args:
        err: the error.
        hint: the way out, when ``err`` carries none.

    Returns:
        ``error`` (the class name), ``message``, ``hint``, and for a torchkeep error also
        ``path`` and ``key`` (``None`` when absent).
    """
    if isinstance(err, tk.TorchkeepError):
        return {
            "error": type(err).__name__,
            "message": err.message,
            "hint": err.hint or hint,
            "path": err.path,
            "key": err.key,
        }
    return {"error": type(err).__name__, "message": str(err), "hint": hint}


def report_error(
    err: BaseException, *, hint: str | None = None, json_document: bool = True
) -> None:
    """Print ``ErrorName: message`` (and a hint line) to stderr; under ``--json`` also the
    :func:`error_document` on stdout.

    Args:
        err: the error; its class name and ``str()`` are printed.
        hint: an extra line saying how to fix it.
        json_document: ``False`` when the command already printed its JSON document for this
            failure (``export``'s report of a failed verification): stdout holds one document.
    """
    if json_document and _JSON_OUTPUT.get():
        emit_json(error_document(err, hint=hint))
    text = Text()
    text.append(type(err).__name__, style="bold red")
    text.append(f": {err}")
    if hint:
        text.append(f"\n  hint: {hint}")
    stderr_console().print(text)


def fail(message: str, *, code: int = 1) -> NoReturn:
    """End a command that found a problem (not an exception): ``error: message`` on stderr.

    For outcomes a command checks itself, e.g. ``demo`` finding a difference. Under ``--json``,
    stdout also gets ``{"error": "UsageError" (code 2) or "Error", "message": ..., "hint": null}``.

    Args:
        message: what went wrong.
        code: the exit code (2 for a usage error: a bad option value).

    Raises:
        typer.Exit: always.
    """
    if _JSON_OUTPUT.get():
        emit_json(
            {"error": "UsageError" if code == 2 else "Error", "message": message, "hint": None}
        )
    text = Text()
    text.append("error", style="bold red")
    text.append(f": {message}")
    stderr_console().print(text)
    raise typer.Exit(code)


def _json_parameter(func: Callable[..., Any]) -> str | None:
    """The name of ``func``'s parameter declared ``typer.Option("--json")``, if it has one."""
    try:
        signature = inspect.signature(func, eval_str=True)
    except (NameError, TypeError, ValueError):  # annotations naming locals: no --json to find
        return None
    for name, parameter in signature.parameters.items():
        for info in typing.get_args(parameter.annotation)[1:]:
            if isinstance(info, OptionInfo) and "--json" in (
                info.default,
                *(info.param_decls or ()),
            ):
                return name
    return None


def handle_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn torchkeep's errors raised by a command into ``ErrorName: message`` and exit code 1.

    The message is followed by the error's hint (the way out) on its own line. With the
    command's ``--json`` flag, stdout gets the :func:`error_document` as well, so that a program
    reading the JSON sees the failure too. A missing optional dependency (an
    :class:`ImportError` for a module in :data:`EXTRAS`) is reported with the
    ``pip install 'torchkeep[extra]'`` line that fixes it. Other exceptions are bugs and
    propagate with their traceback.

    Args:
        func: a command function.

    Returns:
        The wrapped function, with the same signature (typer reads it).
    """
    json_flag = _json_parameter(func)

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        token = _JSON_OUTPUT.set(bool(json_flag and kwargs.get(json_flag)))
        try:
            return func(*args, **kwargs)
        except tk.TorchkeepError as err:
            report_error(err)
            raise typer.Exit(1) from None
        except ImportError as err:
            extra = _missing_extra(err)
            if extra is None:
                raise
            report_error(err, hint=f"pip install 'torchkeep[{extra}]'")
            raise typer.Exit(1) from None
        finally:
            _JSON_OUTPUT.reset(token)

    return wrapper
