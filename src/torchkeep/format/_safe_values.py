"""Harmless values that real checkpoints carry, rebuilt by torchkeep's own code from an allow-list.

Files people already have hold more than tensors: the tutorials' ``torch.__version__`` (a
``TorchVersion``), Lightning's hyperparameters (``pathlib`` paths), the RNG states that the Hugging
Face Trainer (``rng_state.pth``) and Accelerate (``random_states_*.pkl``) save (numpy ``uint32``
arrays inside ``np.random.get_state()`` tuples), numpy scalars and dtypes, and ``b""`` (which
protocol 2 pickles as ``bytes()``). torch's ``weights_only`` unpickler refuses all of them, so those
files could only be opened with ``trust=True``.

This module lets them load without trust, and without ever calling numpy's or pathlib's own
unpickling functions with arguments chosen by the file. Every global name below is mapped, through
``torch.serialization.safe_globals``' ``(callable, "module.qualname")`` form, to a function or stub
class of ours that checks its arguments (types, sizes, dtype codes from a fixed list, byte lengths
that match the shape) and only then builds the value with plain constructors
(``np.frombuffer``, ``PurePosixPath(*parts)``...). numpy arrays and dtypes are built in two pickle
steps (REDUCE, then BUILD with a state), so they first come out of torch's unpickler as stubs;
:func:`resolve` swaps the finished values in. Anything else the file names stays refused.

The allow-list is used only after the static scan of :mod:`._pickle_scan` found no other refused
global, and :mod:`._pickle_codecs` then also requires every ``_codecs.encode`` call to have the one
form pickle itself writes for bytes (``encode(text, "latin1")``).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import numpy as np
import torch
import torch.serialization
from torch.torch_version import TorchVersion

from torchkeep.errors import CorruptCheckpointError, UnsafeCheckpointError

__all__ = [
    "SAFE_VALUE_GLOBALS",
    "numpy_dtype",
    "rebuilding_safe_values",
    "resolve",
]

MAX_TEXT = 1 << 20  # characters in one version string or path
MAX_PARTS = 4096  # components of one path
MAX_STRING_ITEMSIZE = 1 << 20  # bytes per element of an S/U array
_HINT = "the file is damaged or was altered; restore it from a copy"
_TRUST_HINT = (
    "if you trust where this file comes from, pass trust=True (it runs code from the file); "
    "better, convert it once to safetensors in a sandbox"
)

# numpy dtype codes torchkeep rebuilds: bool, integers, floats (incl. long double), complex, and
# fixed-width byte and unicode strings. Never objects, structured or void dtypes.
_LONG = {np.dtype(np.longdouble).itemsize, np.dtype(np.clongdouble).itemsize // 2}
_FLOAT_SIZES = "|".join(str(n) for n in sorted({2, 4, 8, *_LONG}))
_COMPLEX_SIZES = "|".join(str(2 * n) for n in sorted({4, 8, *_LONG}))
_CODE = re.compile(
    rf"(b1|[iu][1248]|f(?:{_FLOAT_SIZES})|c(?:{_COMPLEX_SIZES})|[SU](?:0|[1-9][0-9]{{0,7}}))"
)
_DTYPE_TEXT = re.compile(rf"([<>|=]?){_CODE.pattern}")


class _BadValue(Exception):
    """A rebuild function refused its arguments (becomes a torchkeep error with the path)."""

    def __init__(self, message: str, *, unsafe: bool = False) -> None:
        super().__init__(message)
        self.unsafe = unsafe


def numpy_dtype(text: object) -> np.dtype[Any]:
    """The numpy dtype written as ``text`` (``dtype.str``: ``"<u4"``, ``"|b1"``, ``"<U5"``), if it
    is one torchkeep rebuilds.

    Raises:
        ValueError: any other text (objects, structured dtypes, a typo).
    """
    match = _DTYPE_TEXT.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"numpy dtype {str(text)[:40]!r} is not one torchkeep rebuilds")
    code = match.group(2)
    if code[0] in "SU" and int(code[1:]) * (4 if code[0] == "U" else 1) > MAX_STRING_ITEMSIZE:
        raise ValueError(f"numpy dtype {text!r} has elements over {MAX_STRING_ITEMSIZE} bytes")
    try:
        dtype = np.dtype(code)
    except TypeError as exc:  # a long double size this platform does not have
        raise ValueError(f"numpy dtype {text!r} does not exist on this platform") from exc
    order = match.group(1)
    if order == "<" and dtype.itemsize > 1:
        return dtype.newbyteorder("<")
    return dtype.newbyteorder(">") if order == ">" and dtype.itemsize > 1 else dtype


def _text(value: object, what: str) -> str:
    if type(value) is not str or len(value) > MAX_TEXT:
        raise _BadValue(f"{what} is not a string of at most {MAX_TEXT} characters")
    return value


class _TorchVersion:
    """Stands for ``torch.torch_version.TorchVersion`` (pickled with NEWOBJ, ``cls.__new__``)."""

    def __new__(cls, version: object = None) -> Any:  # noqa: PYI034 - returns the real class
        return TorchVersion(_text(version, "a TorchVersion"))


def _path_parts(kind: str, parts: tuple[object, ...]) -> list[str]:
    if len(parts) > MAX_PARTS:
        raise _BadValue(f"a {kind} with {len(parts)} parts (over {MAX_PARTS})")
    texts = [_text(p, f"a part of a {kind}") for p in parts]
    if sum(map(len, texts)) > MAX_TEXT:
        raise _BadValue(f"a {kind} longer than {MAX_TEXT} characters")
    return texts


def _posix_path(*parts: object) -> pathlib.PurePath:
    texts = _path_parts("PosixPath", parts)
    # a concrete path cannot be made for the other OS: give the pure path of the same flavour
    return pathlib.PosixPath(*texts) if os.name == "posix" else pathlib.PurePosixPath(*texts)


def _windows_path(*parts: object) -> pathlib.PurePath:
    texts = _path_parts("WindowsPath", parts)
    return pathlib.WindowsPath(*texts) if os.name == "nt" else pathlib.PureWindowsPath(*texts)


def _pure_posix_path(*parts: object) -> pathlib.PurePosixPath:
    return pathlib.PurePosixPath(*_path_parts("PurePosixPath", parts))


def _pure_windows_path(*parts: object) -> pathlib.PureWindowsPath:
    return pathlib.PureWindowsPath(*_path_parts("PureWindowsPath", parts))


class _Stub:
    """A numpy value under construction by the unpickler (REDUCE made it, BUILD completes it)."""

    __slots__ = ("value",)

    def finished(self) -> Any:
        value = getattr(self, "value", None)
        if value is None:
            raise _BadValue(f"a numpy {self._what} that was never given its state")
        return value

    _what = "value"

    def _set_once(self, value: Any) -> None:
        if getattr(self, "value", None) is not None:
            raise _BadValue(f"a numpy {self._what} given its state twice")
        self.value = value


class _DType(_Stub):
    """Stands for ``numpy.dtype``: ``dtype(code, False, True)``, then the state tuple numpy writes
    (version 3: byte order, no subarray, names or fields, element size and alignment for
    strings, flags 0)."""

    __slots__ = ("code",)
    _what = "dtype"

    def __init__(self, code: object = None, align: object = False, copy: object = True) -> None:
        if type(code) is not str or _CODE.fullmatch(code) is None or align is not False:
            raise _BadValue(
                f"numpy dtype {str(code)[:40]!r} is not one torchkeep rebuilds "
                "(bool, integer, float, complex and fixed-width string dtypes only)",
                unsafe=True,
            )
        self.code = code

    def __setstate__(self, state: object) -> None:
        code = getattr(self, "code", None)
        if code is None or type(state) is not tuple or len(state) != 8 or state[0] != 3:
            raise _BadValue("a numpy dtype state that numpy does not write")
        order = state[1]
        if order not in ("<", ">", "|", "=") or state[2:5] != (None, None, None):
            raise _BadValue(f"a numpy dtype state that numpy does not write ({state[1:5]!r})")
        try:
            dtype = numpy_dtype(("" if order == "=" else order) + code)
        except ValueError as exc:
            raise _BadValue(str(exc)) from exc
        expected = (-1, -1, 0)
        if dtype.kind in "SU":
            expected = (dtype.itemsize, dtype.alignment, 8 if dtype.kind == "U" else 0)
        if state[5:] != expected or (order == "|") != (dtype.itemsize == 1 or dtype.kind == "S"):
            raise _BadValue(f"a numpy dtype state that does not fit {dtype.str} ({state!r})")
        self._set_once(dtype)


def _dtype_of(value: object) -> np.dtype[Any]:
    if type(value) is not _DType:
        raise _BadValue(f"a numpy dtype expected, not {type(value).__name__}")
    dtype: np.dtype[Any] = value.finished()
    return dtype


class _Array(_Stub):
    """Stands for ``numpy.ndarray``: made empty by ``_reconstruct``, filled by its state
    ``(1, shape, dtype, is_fortran, raw bytes)``."""

    __slots__ = ()
    _what = "array"

    def __setstate__(self, state: object) -> None:
        if type(state) is not tuple or len(state) != 5 or state[0] != 1:
            raise _BadValue("a numpy array state that numpy does not write")
        _, shape, dtype_stub, fortran, raw = state
        if type(shape) is not tuple or not all(type(n) is int and n >= 0 for n in shape):
            raise _BadValue(f"a numpy array shape that is not a tuple of sizes ({shape!r})")
        if len(shape) > 64 or type(fortran) is not bool or type(raw) is not bytes:
            raise _BadValue("a numpy array state that numpy does not write")
        dtype = _dtype_of(dtype_stub)
        count = 1
        for n in shape:
            count *= n
        if count * dtype.itemsize != len(raw):
            raise _BadValue(
                f"a numpy array of shape {shape} and dtype {dtype.str} needs "
                f"{count * dtype.itemsize} bytes, the file holds {len(raw)}"
            )
        flat = np.frombuffer(raw, dtype=dtype)
        self._set_once(flat.reshape(shape, order="F" if fortran else "C").copy(order="K"))


def _reconstruct(subtype: object, shape: object, typecode: object) -> _Array:
    """Stands for ``numpy.core.multiarray._reconstruct``: only for plain ``ndarray``."""
    if subtype is not _Array or shape != (0,) or typecode != b"b":
        raise _BadValue(
            "numpy's _reconstruct asked for something else than a plain array", unsafe=True
        )
    return _Array()


def _scalar(dtype_stub: object, data: object = None) -> Any:
    """Stands for ``numpy.core.multiarray.scalar``: one element of a dtype, from its bytes."""
    dtype = _dtype_of(dtype_stub)
    if type(data) is not bytes or len(data) != dtype.itemsize:
        raise _BadValue(f"a numpy {dtype.str} scalar without its {dtype.itemsize} bytes")
    if not dtype.itemsize:  # np.str_(""), np.bytes_(b"")
        return dtype.type()
    return np.frombuffer(data, dtype=dtype)[0]


def _bytes(*args: object) -> bytes:
    """Stands for ``bytes``: pickle's protocol 2 writes ``b""`` as ``bytes()`` (torch refuses it,
    so an empty numpy array would not load); nothing else."""
    if args:
        raise _BadValue("bytes() called with arguments, which pickle never writes", unsafe=True)
    return b""


_PATHS = {
    "PosixPath": _posix_path,
    "WindowsPath": _windows_path,
    "PurePosixPath": _pure_posix_path,
    "PureWindowsPath": _pure_windows_path,
}
_REBUILDS: dict[str, Any] = {
    "builtins.bytes": _bytes,
    "torch.torch_version.TorchVersion": _TorchVersion,
    **{f"pathlib.{name}": fn for name, fn in _PATHS.items()},
    **{f"pathlib._local.{name}": fn for name, fn in _PATHS.items()},  # Python >= 3.13
    "numpy.ndarray": _Array,
    "numpy.dtype": _DType,
    **{
        f"{m}._reconstruct": _reconstruct
        for m in ("numpy.core.multiarray", "numpy._core.multiarray")
    },
    **{f"{m}.scalar": _scalar for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
}
SAFE_VALUE_GLOBALS: frozenset[str] = frozenset(_REBUILDS)
"""The globals a file may name beyond torch's own allowlist and still load without trust."""
_ALLOWLIST_LOCK = threading.RLock()


@contextlib.contextmanager
def rebuilding_safe_values(path: str) -> Iterator[None]:
    """Inside this block torch's ``weights_only`` unpickler rebuilds the allow-listed values with
    torchkeep's functions; a value they refuse raises a torchkeep error naming ``path``.

    Raises:
        UnsafeCheckpointError: a value no real numpy or pathlib writes (an object dtype array...).
        CorruptCheckpointError: a value whose parts do not fit together.
    """
    ours: list[Callable[..., Any] | tuple[Callable[..., Any], str]]
    ours = [(fn, name) for name, fn in _REBUILDS.items()]
    # torch keeps its allowlist in one process-wide set: one load at a time changes it, and
    # entries the user added under the same names (numpy's own functions) step aside meanwhile,
    # or torch would pick between theirs and ours at random.
    with _ALLOWLIST_LOCK:
        before = torch.serialization.get_safe_globals()
        others = [e for e in before if _entry_name(e) not in SAFE_VALUE_GLOBALS]
        torch.serialization.clear_safe_globals()
        try:
            torch.serialization.add_safe_globals(others + ours)
            yield
        except _BadValue as exc:
            _raise_for(exc, path)
        finally:
            torch.serialization.clear_safe_globals()
            torch.serialization.add_safe_globals(before)


def _entry_name(entry: Any) -> str:
    if isinstance(entry, tuple):
        return str(entry[1]) if len(entry) == 2 else ""
    return f"{getattr(entry, '__module__', '?')}.{getattr(entry, '__qualname__', '?')}"


def _raise_for(exc: _BadValue, path: str) -> NoReturn:
    if exc.unsafe:
        raise UnsafeCheckpointError(
            f"refusing to load: {exc}", path=path, hint=_TRUST_HINT
        ) from exc
    raise CorruptCheckpointError(f"cannot rebuild {exc}", path=path, hint=_HINT) from exc


_CONTAINERS = (dict, OrderedDict, list, tuple, set, frozenset)


def resolve(obj: Any, path: str) -> Any:
    """``obj`` as loaded inside :func:`rebuilding_safe_values`, with every stub replaced by its
    finished numpy value (containers are updated in place, tuples rebuilt)."""
    done: dict[int, Any] = {}

    def walk(x: Any) -> Any:
        if isinstance(x, _Stub):
            return x.finished()
        kind = type(x)
        if kind not in _CONTAINERS and not isinstance(x, torch.Tensor):
            return x
        if id(x) in done:
            return done[id(x)]
        done[id(x)] = x
        if kind is OrderedDict or isinstance(x, torch.Tensor):
            # attributes set by BUILD (a state dict's _metadata, a tensor's python attributes)
            for name, value in list(vars(x).items()):
                setattr(x, name, walk(value))
            if isinstance(x, torch.Tensor):
                return x
        if kind is list:
            x[:] = [walk(v) for v in x]
        elif kind is dict or kind is OrderedDict:
            items = [(walk(k), walk(v)) for k, v in x.items()]
            x.clear()
            x.update(items)
        else:
            items = [walk(v) for v in x]
            if any(a is not b for a, b in zip(items, x, strict=True)):
                done[id(x)] = kind(items)
        return done[id(x)]

    try:
        return walk(obj)
    except _BadValue as exc:
        raise CorruptCheckpointError(f"cannot rebuild {exc}", path=path, hint=_HINT) from exc
    except (RecursionError, TypeError) as exc:  # TypeError: an array used as a dict key
        raise CorruptCheckpointError(
            f"cannot rebuild the numpy values ({type(exc).__name__}: {exc})", path=path, hint=_HINT
        ) from exc
