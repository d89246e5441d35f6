"""The one form of ``_codecs.encode`` a file that needs torchkeep's allow-list may call.

torch's ``weights_only`` unpickler allows ``_codecs.encode`` with any arguments, because pickle's
protocol 2 writes every ``bytes`` object (numpy's array and scalar data among them) as
``encode(text, "latin1")``. Other codecs (``rot13``, ``hex``, ``zlib``...) are never written by
pickle, and a codec name may import a module of the ``encodings`` package. A file that needs the
allow-list of :mod:`._safe_values` is held to the ``latin1`` form: this module walks its opcodes,
with a small model of the stack and memo, and never unpickles anything.
"""

from __future__ import annotations

import io
import os
import pickletools
import warnings
import zipfile
from typing import IO, Any

from torchkeep.errors import CorruptCheckpointError, UnsafeCheckpointError
from torchkeep.format._pickle_files import LEGACY_PICKLES, open_zip, read_member

# The scanner's model of the pickle stack: the same markers, so the same opcodes mean the same
from torchkeep.format._pickle_scan import _MARK, _UNKNOWN, _apply_stack_effect
from torchkeep.storage import storage_for

__all__ = ["check_codecs"]

_HINT = "the file is damaged or was altered; restore it from a copy"
_TRUST_HINT = (
    "if you trust where this file comes from, pass trust=True (it runs code from the file); "
    "better, convert it once to safetensors in a sandbox"
)


_LATIN1 = ("latin1", "latin-1")


def _codecs_calls(stream: IO[bytes], size: int, max_pickles: int) -> list[str]:
    """Every ``_codecs.encode`` call in up to ``max_pickles`` pickles whose arguments are not
    ``(text, "latin1")``, described; walks opcodes only, never unpickles."""
    bad: list[str] = []
    for index in range(max_pickles):
        if index and stream.tell() >= size:
            break
        stack: list[Any] = []
        memo: dict[Any, Any] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pickletools warns on bad string escapes
            for op, arg, pos in pickletools.genops(stream):
                name = op.name
                top = stack[-1] if stack else _UNKNOWN
                if name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
                    stack.append(arg)
                elif name in ("GLOBAL", "INST"):
                    module, _, qualname = str(arg).partition(" ")
                    stack.append(("global", f"{module}.{qualname}"))
                elif name == "STACK_GLOBAL":
                    attr = stack.pop() if stack else _UNKNOWN
                    owner = stack.pop() if stack else _UNKNOWN
                    known = isinstance(owner, str) and isinstance(attr, str)
                    stack.append(("global", f"{owner}.{attr}" if known else "?"))
                elif name == "MEMOIZE":
                    memo[len(memo)] = top
                elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[arg] = top
                elif name in ("GET", "BINGET", "LONG_BINGET"):
                    stack.append(memo.get(arg, _UNKNOWN))
                elif name == "MARK":
                    stack.append(_MARK)
                elif name == "TUPLE":
                    items: list[Any] = []
                    while stack and (item := stack.pop()) is not _MARK:
                        items.insert(0, item)
                    stack.append(tuple(items))
                elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                    n = int(name[-1])
                    items = stack[-n:] if len(stack) >= n else [_UNKNOWN] * n
                    del stack[-n:]
                    stack.append(tuple(items))
                elif name == "EMPTY_TUPLE":
                    stack.append(())
                elif name == "REDUCE":
                    args = stack.pop() if stack else _UNKNOWN
                    func = stack.pop() if stack else _UNKNOWN
                    if not (isinstance(func, tuple) and len(func) == 2 and func[0] == "global"):
                        bad.append(f"a call of a computed value at byte {pos}")
                    elif func[1] in ("_codecs.encode", "?") and not (
                        isinstance(args, tuple)
                        and len(args) == 2
                        and isinstance(args[0], str)
                        and args[1] in _LATIN1
                    ):
                        bad.append(f"{func[1]}{_short(args)} at byte {pos}")
                    stack.append(_UNKNOWN)
                elif name == "DUP":
                    stack.append(top)
                else:
                    _apply_stack_effect(op, stack)
    return bad


def _short(args: Any) -> str:
    if not isinstance(args, tuple):
        return "(...)"
    return "(" + ", ".join(repr(a)[:20] if isinstance(a, str) else "..." for a in args) + ")"


def check_codecs(path: str, *, zip_format: bool) -> None:
    """Refuse a file whose pickles call ``_codecs.encode`` other than as pickle writes bytes.

    torch's unpickler allows ``_codecs.encode`` with any arguments; a file that also needs the
    allow-list is held to the one form numpy's pickles (and pickle's own bytes) use.

    Raises:
        UnsafeCheckpointError: another use, named with its arguments.
        CorruptCheckpointError: a pickle that does not parse.
    """
    bad: list[str] = []
    try:
        if zip_format:
            with open_zip(path) as archive:
                for name in archive.namelist():
                    if name.endswith(".pkl"):
                        data = read_member(archive, name, path)
                        bad += _codecs_calls(io.BytesIO(data), len(data), 1)
        else:
            with storage_for(path).open_read(path) as f:
                bad += _codecs_calls(f, os.fstat(f.fileno()).st_size, LEGACY_PICKLES)
    except (ValueError, EOFError, OSError, zipfile.BadZipFile) as exc:
        raise CorruptCheckpointError(
            f"cannot parse the pickle ({exc})", path=path, hint=_HINT
        ) from exc
    if bad:
        raise UnsafeCheckpointError(
            "refusing to load: the file calls " + "; ".join(bad[:5]) + ", which pickle never "
            "writes for numpy values or bytes",
            path=path,
            globals=["_codecs.encode"],
            hint=_TRUST_HINT,
        )
