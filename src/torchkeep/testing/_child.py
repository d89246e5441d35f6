"""One invocation of a ``train_fn`` in a fresh Python process, and naming the function.

A child process gets only ``"module:qualname"``, the run directory and the stop point on its
command line: it imports the function itself (its module's root directory is put on its
``PYTHONPATH``), calls it, and writes the losses it returned to a JSON file, as hex floats so
that they come back bit for bit.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from torchkeep.errors import InvalidArgumentError
from torchkeep.storage import storage_for

TrainFn = Callable[[str, int | None], Sequence[float]]

_CHILD = "from torchkeep.testing._child import _child_main; _child_main()"
_TAIL_CHARS = 4000


class TrainProcessError(AssertionError):
    """A ``train_fn`` process failed (raised, crashed, timed out, returned no list of losses).

    The message holds the end of the child's stderr (its traceback).
    """


@dataclass(frozen=True, slots=True)
class _Invocation:
    stop_at: int | None
    losses: list[float]
    seconds: float


# -- running one invocation -------------------------------------------------------------------


def _invoke(
    spec: str, env: dict[str, str], run_dir: Path, stop: int | None, *, timeout: float, label: str
) -> _Invocation:
    """Run ``train_fn(run_dir, stop)`` in a fresh interpreter and read back its losses."""
    call = f"{spec}({str(run_dir)!r}, stop_at={stop})"
    with tempfile.TemporaryDirectory(prefix="torchkeep-child-") as tmp:
        result = Path(tmp) / "losses.json"
        command = [
            sys.executable,
            "-c",
            _CHILD,
            spec,
            str(run_dir),
            "none" if stop is None else str(stop),
            str(result),
        ]
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise TrainProcessError(
                f"{label}: {call} did not finish within {timeout:g} s and was killed\n"
                f"{_tail(exc.stderr)}"
            ) from None
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            status = (
                f"killed by signal {-proc.returncode}"
                if proc.returncode < 0
                else f"exit status {proc.returncode}"
            )
            raise TrainProcessError(f"{label}: {call} failed ({status})\n{_tail(proc.stderr)}")
        try:
            document = json.loads(result.read_text(encoding="utf-8"))
            losses = [float.fromhex(h) for h in document["losses"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise TrainProcessError(
                f"{label}: {call} exited without reporting its losses ({exc})\n{_tail(proc.stderr)}"
            ) from None
    return _Invocation(stop_at=stop, losses=losses, seconds=seconds)


def _tail(text: str | bytes | None) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    text = (text or "").rstrip()
    if not text:
        return "(its stderr is empty)"
    if len(text) > _TAIL_CHARS:
        text = "..." + text[-_TAIL_CHARS:]
    return "the end of its stderr:\n" + text


def _child_env(root: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    if root is not None:
        paths = [str(root), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def _child_main() -> None:
    """Entry point of a child process: ``SPEC RUN_DIR STOP|none RESULT_FILE``."""
    spec, run_dir, stop_text, result_path = sys.argv[1:5]
    module_name, _, qualname = spec.partition(":")
    train_fn = _import_target(module_name, qualname)
    stop = None if stop_text == "none" else int(stop_text)
    losses = train_fn(run_dir, stop)
    document = {"losses": [x.hex() for x in _as_floats(losses, spec)]}
    data = json.dumps(document).encode()

    def write(f: BinaryIO) -> None:
        f.write(data)

    storage_for(result_path).write_atomic(result_path, write)


def _as_floats(losses: Any, spec: str) -> list[float]:
    if isinstance(losses, str | bytes | Mapping) or not isinstance(losses, Sequence):
        raise TypeError(f"{spec} must return the list of losses it logged, not {losses!r:.200}")
    out = []
    for i, value in enumerate(losses):
        if isinstance(value, str | bytes | bool):
            raise TypeError(f"{spec} returned a non-number loss at index {i}: {value!r:.100}")
        try:
            out.append(float(value))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(
                f"{spec} returned a loss at index {i} that is not a number: {value!r:.100}"
            ) from exc
    return out


# -- naming the function ----------------------------------------------------------------------


def _resolve(train_fn: TrainFn | str) -> tuple[str, Path | None]:
    """``"module:qualname"`` for ``train_fn``, and the directory a child needs on its path."""
    if isinstance(train_fn, str):
        module_name, sep, qualname = train_fn.partition(":")
        if not sep or not module_name or not qualname:
            raise InvalidArgumentError(
                f"train_fn {train_fn!r} must be written 'package.module:function'"
            )
        _import_target(module_name, qualname)
    else:
        if not callable(train_fn):
            raise TypeError("train_fn must be a function or a 'module:function' string")
        module_name = getattr(train_fn, "__module__", None) or ""
        qualname = getattr(train_fn, "__qualname__", None) or ""
        if not module_name or not qualname or "<" in qualname:
            raise InvalidArgumentError(
                f"train_fn {train_fn!r} is not a module-level function: a fresh process cannot "
                "import it (define it at the top level of a module)"
            )
        if module_name == "__main__":
            raise InvalidArgumentError(
                f"train_fn {qualname} is defined in __main__, which a fresh process cannot "
                "import: move it into a module, or pass 'package.module:function'"
            )
        if _import_target(module_name, qualname) is not train_fn:
            raise InvalidArgumentError(
                f"{module_name}:{qualname} does not name the train_fn given (redefined or "
                "decorated without functools.wraps?)"
            )
    return f"{module_name}:{qualname}", _import_root(module_name)


def _import_target(module_name: str, qualname: str) -> Any:
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidArgumentError(
            f"cannot import train_fn's module {module_name!r}: {exc}"
        ) from exc
    for part in qualname.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise InvalidArgumentError(f"module {module_name!r} has no {qualname!r}") from None
    if not callable(target):
        raise InvalidArgumentError(f"{module_name}:{qualname} is not callable")
    return target


def _import_root(module_name: str) -> Path | None:
    """The directory from which ``import module_name`` finds the module, when it is a file."""
    module = sys.modules.get(module_name)
    file = getattr(module, "__file__", None)
    if not file:
        return None
    path = Path(file).absolute()
    depth = module_name.count(".") + (1 if path.stem == "__init__" else 0)
    root = path.parent
    for _ in range(depth):
        root = root.parent
    return root
