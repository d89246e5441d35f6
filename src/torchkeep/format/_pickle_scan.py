"""List the Python globals a pickle-based checkpoint would import, without unpickling it.

Files written by ``torch.save`` are pickles: torch's zip format keeps one in ``<archive>/data.pkl``,
the legacy format is five pickles in a row followed by raw storage bytes, and some files are a
bare pickle. Unpickling any of them may import and call whatever the file names (``os.system``,
``builtins.eval``...). This module walks the opcodes with :func:`pickletools.genops` and never
executes or unpickles anything: it reports every ``module.qualname`` the file would import
(``GLOBAL``, ``INST``, and ``STACK_GLOBAL`` with its operands resolved through a small model of
the stack and memo) and which of them torch's ``weights_only`` unpickler would refuse.

A static scan is only a tripwire. Published pickle scanners are bypassed routinely: parsers
that disagree with the real unpickler, zip readers that disagree with torch's, operands that
cannot be resolved without running code. A clean scan therefore proves nothing; the real gate
is torch's ``weights_only=True`` unpickler, and torchkeep never falls back to
``weights_only=False``. The scan names the offending globals when that unpickler refuses a file,
stops obviously hostile files before they reach it, and backs ``torchkeep scan``. It fails
closed: what it cannot parse is reported as corrupt (or unsafe), never as clean.

It is also bounded: each scan has a budget of opcodes, stack and memo entries, seconds, and
bytes that pickles may inflate to from their compressed size (see ``MAX_OPCODES``...), far
beyond what real checkpoints need, and a file beyond it is refused as unsafe within a second
or two rather than scanned for minutes. A zip with two members of one name is refused too:
zipfile reads the last, torch the first.
"""

from __future__ import annotations

import copyreg
import functools
import importlib
import io
import json
import os
import pickletools
import stat
import struct
import tarfile
import time
import warnings
import zipfile
import zlib
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from dataclasses import dataclass
from typing import IO, Any, cast

from torchkeep.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    TorchkeepError,
    UnsafeCheckpointError,
)
from torchkeep.format._safe_values import SAFE_VALUE_GLOBALS
from torchkeep.storage import storage_error, storage_for

__all__ = [
    "COMPILED_CODE",
    "TAR_FORMAT",
    "UNRESOLVED",
    "ZIP_ERRORS",
    "PickleScan",
    "is_allowed_global",
    "scan_file",
    "scan_pickle_bytes",
]

UNRESOLVED = "<unresolved STACK_GLOBAL>"
TAR_FORMAT = "<tar format of PyTorch < 0.4>"
COMPILED_CODE = "<compiled code (a shared library)>"
_COMPILED = (".so", ".dll", ".dylib", ".pyd", ".cubin", ".o", ".hsaco", ".spv")
MAX_RECORD_BYTES = 512 * 1024 * 1024  # a data.pkl holds structure only; tensors live elsewhere
LEGACY_PICKLES = 5  # magic number, protocol version, sys_info, the object, the storage keys
# Budgets of one scan, far above what real checkpoints need (measured on torch 2.13: a state dict
# pickles to ~30 opcodes, ~8 memo entries and ~250 bytes per tensor, stored uncompressed or
# deflating ~4:1), so that a crafted pickle is refused in a second or two instead of keeping the
# scanner busy for minutes and gigabytes. Read on every scan (tests lower them).
MAX_OPCODES = 40_000_000  # ~1.3 million tensors
MAX_STACK = 1_000_000  # pickle batches containers by 1,000 items; nesting adds a few each
MAX_MEMO = 4_000_000  # memoized strings (the only memo values a scan needs)
MAX_SCAN_SECONDS = 60.0  # a wall-clock backstop, checked with the others
MAX_DEFLATE_RATIO = 50  # decompressed / compressed bytes of the pickles, beyond a small floor
DEFLATE_FLOOR = 1 << 20  # pickles up to 1 MiB decompress freely
_CHECK_EVERY = 4096  # opcodes between two checks of the budget
_ZIP_MAGIC = b"PK\x03\x04"
# torch never allows these modules, even when a user allowlists something from them
_BLOCKED_MODULES = frozenset({"sys", "os", "posix", "nt"})
_STRING_OPS = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"}
    | {"STRING", "BINSTRING", "SHORT_BINSTRING"}
)
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_EXT_OPS = frozenset({"EXT1", "EXT2", "EXT4"})
_PARSE_ERRORS = (ValueError, EOFError, OverflowError, struct.error)
# what zipfile raises on damaged or hostile archives (OSError: seeks to offsets that lie;
# NotImplementedError: a "version needed" above 6.3 or a compression method it lacks, raised by
# ZipFile() itself for any member; RuntimeError: an encrypted member)
ZIP_ERRORS: tuple[type[Exception], ...] = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError)
ZIP_ERRORS += (NotImplementedError, RuntimeError, zlib.error, KeyError, IndexError, *_PARSE_ERRORS)
_ZIP_ERRORS = ZIP_ERRORS
_MARK = object()
_UNKNOWN = object()
_HINT_CORRUPT = "the file is damaged or is not a PyTorch checkpoint; re-download or re-save it"
_HINT_UNSAFE = (
    "do not load this file; a pickle that breaks off after importing code is an attack pattern"
)


@dataclass(frozen=True, kw_only=True, slots=True)
class PickleScan:
    """What a static scan of a pickle-based file found.

    Attributes:
        path: the file scanned.
        records: the pickles scanned: zip record names (``"archive/data.pkl"``), or
            ``"<pickle 0>"``, ``"<pickle 1>"``... for the legacy format and bare pickles.
        globals: every ``module.qualname`` the file would import, in first-seen order.
        unsafe: those torchkeep refuses to load without ``trust``: refused by torch's
            ``weights_only`` unpickler (:func:`is_allowed_global`) and not rebuilt by torchkeep,
            including :data:`UNRESOLVED` for a ``STACK_GLOBAL`` whose operands are unknown,
            :data:`TAR_FORMAT` for the pre-0.4 tar format (refused by torch, not scanned) and
            :data:`COMPILED_CODE` for a shared library in a ``.pt2`` archive.
        rebuilt: the harmless values torch refuses but torchkeep rebuilds with its own checked
            code (numpy arrays, scalars and dtypes, ``pathlib`` paths, ``torch.__version__``):
            ``tk.load`` reads them without ``trust``; plain ``torch.load(weights_only=True)``
            only inside ``torch.serialization.safe_globals``.
    """

    path: str
    records: tuple[str, ...]
    globals: tuple[str, ...]
    unsafe: tuple[str, ...]
    rebuilt: tuple[str, ...] = ()

    @property
    def is_safe(self) -> bool:
        """Nothing that torchkeep would refuse to load without ``trust``."""
        return not self.unsafe

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "records": list(self.records),
            "globals": list(self.globals),
            "unsafe": list(self.unsafe),
            "rebuilt": list(self.rebuilt),
            "is_safe": self.is_safe,
        }


class _Malformed(Exception):
    """A record that does not parse as a pickle (internal; becomes a torchkeep error)."""


_HINT_BUDGET = (
    "a real checkpoint's pickle stays far below this limit; do not load the file. If you trust "
    "where it comes from, torchkeep.load(..., trust=True) skips the scan (and runs its code)"
)


class _Budget:
    """What one scan of one file may spend: opcodes, stack and memo entries, time, bytes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.ops = 0
        self.max_ops, self.max_stack, self.max_memo = MAX_OPCODES, MAX_STACK, MAX_MEMO
        self.deadline = time.monotonic() + MAX_SCAN_SECONDS

    def exceeded(self, record: str, what: str) -> UnsafeCheckpointError:
        return UnsafeCheckpointError(
            f"{record}: refusing to scan further: {what}", path=self.path, hint=_HINT_BUDGET
        )

    def check(self, record: str, stack: list[object], memo: dict[object, object]) -> None:
        if self.ops > self.max_ops:
            raise self.exceeded(record, f"more than {self.max_ops} opcodes")
        if len(stack) > self.max_stack:
            raise self.exceeded(record, f"a stack of more than {self.max_stack} entries")
        if len(memo) > self.max_memo:
            raise self.exceeded(record, f"a memo of more than {self.max_memo} entries")
        if time.monotonic() > self.deadline:
            raise self.exceeded(record, f"over {MAX_SCAN_SECONDS:g} s of scanning")

    def check_inflation(self, record: str, size: int, compressed: int) -> None:
        """Refuse pickles that inflate beyond what pickles deflate to (a zip bomb of opcodes)."""
        allowed = max(DEFLATE_FLOOR, MAX_DEFLATE_RATIO * compressed)
        if size > allowed:
            raise self.exceeded(
                record,
                f"{size} bytes decompress from {compressed} (over {MAX_DEFLATE_RATIO}:1 "
                f"beyond {DEFLATE_FLOOR >> 20} MiB, a zip bomb)",
            )


class _Reader:
    """``f`` up to ``end``, reads clamped to what is left; keeps the raw lines it reads.

    pickletools undoes backslash escapes in GLOBAL/INST names (and fails on bad ones) where
    pickle takes the raw bytes, so those opcodes get a stand-in line and the caller the raw one.
    """

    def __init__(self, f: IO[bytes], end: int) -> None:
        self._f = f
        self._end = end
        self._op = b""
        self.lines: list[bytes] = []

    def tell(self) -> int:
        return self._f.tell()

    def left(self) -> int:
        return max(self._end - self._f.tell(), 0)

    def read(self, n: int = -1) -> bytes:
        left = self.left()
        n = left if n < 0 or n > left else n
        if n > MAX_RECORD_BYTES:
            raise _Malformed(f"an opcode argument of {n} bytes is beyond the scan limit")
        data = self._f.read(n)
        if n == 1:  # an opcode (no opcode reads a 1-byte argument and then a line)
            self._op = data
        return data

    def readline(self) -> bytes:
        line = self._f.readline(min(self.left(), MAX_RECORD_BYTES))
        self.lines.append(line)
        return b"x\n" if self._op in (b"c", b"i") and line.endswith(b"\n") else line


@functools.cache
def _torch_allowed() -> frozenset[str]:
    unpickler = importlib.import_module("torch._weights_only_unpickler")
    return frozenset(unpickler._get_allowed_globals())


def _user_allowed() -> set[str]:
    import torch.serialization

    names: set[str] = set()
    for entry in torch.serialization.get_safe_globals():
        if isinstance(entry, tuple):
            if len(entry) == 2 and isinstance(entry[1], str):
                names.add(entry[1])
        else:
            names.add(f"{getattr(entry, '__module__', '?')}.{getattr(entry, '__qualname__', '?')}")
    return names


def is_allowed_global(name: str) -> bool:
    """Whether torch's ``weights_only`` unpickler lets a file import ``name`` (``module.qualname``).

    Mirrors ``torch._weights_only_unpickler``: its built-in allowlist (containers, tensor, storage
    and dtype types, the ``torch._utils._rebuild_*`` functions) plus what the user added with
    ``torch.serialization.add_safe_globals`` (read on every call), minus the modules torch always
    blocks (``sys``, ``os``, ``posix``, ``nt``; blocked here with their submodules too).
    """
    if name.split(".", 1)[0] in _BLOCKED_MODULES:
        return False
    return name in _torch_allowed() or name in _user_allowed()


def _global_name(module: str, qualname: str) -> str:
    # what the unpickler imports: Python 2 names map to Python 3 ones (torch maps them too)
    if (module, qualname) in NAME_MAPPING:
        module, qualname = NAME_MAPPING[(module, qualname)]
    elif module in IMPORT_MAPPING:
        module = IMPORT_MAPPING[module]
    return f"{module}.{qualname}"


def _apply_stack_effect(op: pickletools.OpcodeInfo, stack: list[object]) -> None:
    before = op.stack_before
    if pickletools.markobject in before:
        while stack and stack.pop() is not _MARK:
            pass
        below = before.index(pickletools.markobject)
    else:
        below = len(before)
    del stack[max(len(stack) - below, 0) :]
    stack.extend([_UNKNOWN] * len(op.stack_after))


def _step(
    op: pickletools.OpcodeInfo,
    arg: Any,
    lines: list[bytes],
    stack: list[object],
    memo: dict[object, object],
    found: dict[str, None],
    memo_size: list[int],
) -> None:
    name = op.name
    top = stack[-1] if stack else _UNKNOWN
    if name in _STRING_OPS:
        stack.append(arg.decode("latin-1") if isinstance(arg, bytes) else arg)
    elif name in ("GLOBAL", "INST"):
        module, qualname = (line[:-1].decode("utf-8", "replace") for line in lines[-2:])
        found[_global_name(module, qualname)] = None
        _apply_stack_effect(op, stack)
    elif name == "STACK_GLOBAL":
        attr = stack.pop() if stack else _UNKNOWN
        owner = stack.pop() if stack else _UNKNOWN
        if isinstance(owner, str) and isinstance(attr, str):
            found[_global_name(owner, attr)] = None
        else:
            found[UNRESOLVED] = None
        stack.append(_UNKNOWN)
    elif name in _PUT_OPS or name == "MEMOIZE":
        # Only strings matter (STACK_GLOBAL operands): anything else is unknown when fetched
        # again, so it is not stored, and the memo costs no more than the strings themselves.
        index = memo_size[0] if name == "MEMOIZE" else arg
        if name == "MEMOIZE":
            memo_size[0] += 1
        if isinstance(top, str):
            memo[index] = top
        else:
            memo.pop(index, None)
    elif name in _GET_OPS:
        stack.append(memo.get(arg, _UNKNOWN))
    elif name in _EXT_OPS:
        registry: dict[int, tuple[str, str]] = getattr(copyreg, "_inverted_registry", {})
        key = registry.get(arg)
        found[f"<extension code {arg}>" if key is None else _global_name(*key)] = None
        stack.append(_UNKNOWN)
    elif name == "MARK":
        stack.append(_MARK)
    elif name == "DUP":
        stack.append(top)
    else:
        _apply_stack_effect(op, stack)


def _scan_stream(
    reader: _Reader,
    max_pickles: int,
    found: dict[str, None],
    records: list[str],
    budget: _Budget,
    record: str | None = None,
) -> None:
    """Scan up to ``max_pickles`` consecutive pickles, stopping cleanly after a STOP.

    Raises:
        UnsafeCheckpointError: the scan went over its ``budget``.
    """
    for index in range(max_pickles):
        if index and not reader.left():
            return
        records.append(f"<pickle {index}>")
        name = record or records[-1]
        stack: list[object] = []
        memo: dict[object, object] = {}
        memo_size = [0]
        reader.lines.clear()
        countdown = _CHECK_EVERY
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pickletools warns on bad string escapes
                for op, arg, _pos in pickletools.genops(cast(IO[bytes], reader)):
                    _step(op, arg, reader.lines, stack, memo, found, memo_size)
                    reader.lines.clear()
                    countdown -= 1
                    if not countdown:
                        budget.ops += _CHECK_EVERY
                        budget.check(name, stack, memo)
                        countdown = _CHECK_EVERY
        except _PARSE_ERRORS as exc:
            raise _Malformed(str(exc) or type(exc).__name__) from exc
        finally:
            budget.ops += _CHECK_EVERY - countdown


def _broken(path: str, record: str, reason: str, found: dict[str, None]) -> TorchkeepError:
    unsafe = [g for g in found if not is_allowed_global(g)]
    if unsafe:
        return UnsafeCheckpointError(
            f"{record} breaks off ({reason}) after asking to import {', '.join(unsafe)}",
            path=path,
            globals=unsafe,
            hint=_HINT_UNSAFE,
        )
    return CorruptCheckpointError(
        f"{record} is not a valid pickle: {reason}", path=path, hint=_HINT_CORRUPT
    )


def scan_pickle_bytes(
    data: bytes, *, name: str = "<pickle>", max_pickles: int = 1
) -> tuple[list[str], int]:
    """The globals in up to ``max_pickles`` consecutive pickles in ``data``, and the byte offset
    where scanning stopped (just after the last STOP read).

    Raises:
        UnsafeCheckpointError: ``data`` breaks off after importing a refused global.
        CorruptCheckpointError: ``data`` is not a pickle, or is truncated or malformed.
    """
    if max_pickles < 1:
        raise ValueError(f"max_pickles must be at least 1, got {max_pickles}")
    found: dict[str, None] = {}
    records: list[str] = []
    reader = _Reader(io.BytesIO(data), len(data))
    try:
        _scan_stream(reader, max_pickles, found, records, _Budget(name))
    except _Malformed as exc:
        raise _broken(name, records[-1], str(exc), found) from exc
    return list(found), reader.tell()


def _scan_zip(
    f: IO[bytes], path: str, found: dict[str, None], budget: _Budget | None = None
) -> list[str]:
    records: list[str] = []
    budget = budget or _Budget(path)
    try:
        with zipfile.ZipFile(f) as archive:
            _refuse_duplicate_members(archive, path)
            infos = [i for i in archive.infolist() if i.filename.endswith(".pkl")]
            if not infos and any(n.endswith("/archive_format") for n in archive.namelist()):
                return _scan_export_archive(archive, path, found, budget)
            if not infos:
                raise CorruptCheckpointError(
                    "zip archive holds no .pkl record", path=path, hint=_HINT_CORRUPT
                )
            # checked before anything is decompressed, for each record and for all of them;
            # a declared compressed size cannot be more than the archive holds
            size = f.seek(0, io.SEEK_END)
            for info in infos:
                packed = min(info.compress_size, size)
                budget.check_inflation(info.filename, info.file_size, packed)
            total, packed = sum(i.file_size for i in infos), sum(i.compress_size for i in infos)
            budget.check_inflation("the .pkl records", total, min(packed, size))
            for info in infos:
                data = read_member(archive, info.filename, path)
                records.append(info.filename)
                try:  # torch reads one pickle per record and ignores what follows its STOP
                    reader = _Reader(io.BytesIO(data), len(data))
                    _scan_stream(reader, 1, found, [], budget, info.filename)
                except _Malformed as exc:
                    raise _broken(path, info.filename, str(exc), found) from exc
    except TorchkeepError:
        raise
    except _ZIP_ERRORS as exc:
        raise _broken(path, "zip archive", str(exc) or type(exc).__name__, found) from exc
    return records


def _refuse_duplicate_members(archive: zipfile.ZipFile, path: str) -> None:
    """Refuse an archive with two members of one name: zipfile reads the last one (twice, when
    asked for each), torch's own zip reader may read the other, so the scan would not see what
    torch loads. torch.save never writes one."""
    seen: set[str] = set()
    for info in archive.infolist():
        if info.filename in seen:
            raise UnsafeCheckpointError(
                f"the zip archive holds two members named {info.filename!r}; a scan cannot tell "
                "which of them torch would load",
                path=path,
                hint="do not load this file: torch.save never writes duplicate members, and a "
                "second copy is a known way to slip a pickle past scanners",
            )
        seen.add(info.filename)


def read_member(archive: zipfile.ZipFile, name: str, path: str) -> bytes:
    """The bytes of one archive member, refusing one that declares more than
    :data:`MAX_RECORD_BYTES` (a zip bomb)."""
    info = archive.getinfo(name)
    if info.file_size > MAX_RECORD_BYTES:
        raise CorruptCheckpointError(
            f"{name} declares {info.file_size} bytes uncompressed, over "
            f"the {MAX_RECORD_BYTES >> 20} MiB limit (a zip bomb?)",
            path=path,
            hint=_HINT_CORRUPT,
        )
    with archive.open(info) as member:  # zipfile stops at the declared size
        return member.read(MAX_RECORD_BYTES)


def is_compiled_code(name: str) -> bool:
    """An archive member that is a shared library or AOTInductor output: loading runs it."""
    return name.endswith(_COMPILED) or "/data/aotinductor/" in name


def _scan_export_archive(
    archive: zipfile.ZipFile, path: str, found: dict[str, None], budget: _Budget
) -> list[str]:
    """A ``torch.export`` archive (``.pt2``): the pickles ``torch.export.load`` would unpickle
    (sample inputs, tensors and objects its payload tables mark as pickled) and compiled code."""
    records: list[str] = []
    names = archive.namelist()
    pickled: list[str] = []
    for name in names:
        base = name.rsplit("/", 1)[-1]
        if is_compiled_code(name):
            found[COMPILED_CODE] = None
            records.append(name)
        elif "/data/sample_inputs/" in name or (
            "/data/constants/" in name and base.startswith(("custom_obj", "opaque_obj"))
        ):
            pickled.append(name)
        elif base.endswith(("_weights_config.json", "_constants_config.json")):
            try:
                table = json.loads(read_member(archive, name, path))["config"].values()
                directory = name.rsplit("/", 1)[0]
                pickled += [f"{directory}/{e['path_name']}" for e in table if e.get("use_pickle")]
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise _broken(path, name, f"not a payload table ({exc})", found) from exc
    for name in dict.fromkeys(pickled):
        if name not in names:
            continue
        info = archive.getinfo(name)
        budget.check_inflation(name, info.file_size, info.compress_size)
        data = read_member(archive, name, path)
        if data.startswith(_ZIP_MAGIC):  # torch.save bytes inside the archive
            inner = _scan_zip(io.BytesIO(data), f"{path}:{name}", found, budget)
            records += [f"{name}:{r}" for r in inner]
        elif data:
            try:
                _scan_stream(_Reader(io.BytesIO(data), len(data)), 1, found, [], budget, name)
            except _Malformed as exc:
                raise _broken(path, name, str(exc), found) from exc
            records.append(name)
    return records


def _is_tar(f: IO[bytes]) -> bool:
    # torch.load tries the pre-0.4 tar format first on any non-zip file; mirror its test
    try:
        with tarfile.open(fileobj=f, mode="r:"):
            return True
    except (tarfile.TarError, *_PARSE_ERRORS, UnicodeError):
        return False
    finally:
        f.seek(0)


def scan_file(path: str | os.PathLike[str]) -> PickleScan:
    """Statically scan a ``torch.save`` file (zip or legacy) or a bare pickle.

    Raises:
        CheckpointNotFoundError: nothing at ``path``.
        UnsafeCheckpointError: a pickle breaks off after importing a refused global.
        CorruptCheckpointError: not a file, empty, or not parseable as the format it claims.
        StorageError: the file exists but cannot be read.
    """
    p = os.fspath(path)
    try:
        mode = os.stat(p).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointNotFoundError(
            f"no file at {p}", path=p, hint="check the path and the working directory"
        ) from None
    except OSError as exc:
        raise storage_error(exc, p, "stat the file") from exc
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise CorruptCheckpointError(
            f"{p} is {kind}, not a pickle-based checkpoint",
            path=p,
            hint="pass the checkpoint file itself",
        )
    found: dict[str, None] = {}
    try:
        with storage_for(p).open_read(p) as f:
            head = f.read(len(_ZIP_MAGIC))
            if not head:
                raise CorruptCheckpointError("the file is empty", path=p, hint=_HINT_CORRUPT)
            f.seek(0)
            if head == _ZIP_MAGIC:
                records = _scan_zip(f, p, found)
            elif _is_tar(f):  # weights_only refuses this format outright; not scanned
                records, found[TAR_FORMAT] = ["<tar archive>"], None
            else:  # legacy torch format (five pickles, then raw bytes) or a bare pickle
                records = []
                reader = _Reader(f, os.fstat(f.fileno()).st_size)
                try:
                    _scan_stream(reader, LEGACY_PICKLES, found, records, _Budget(p))
                except _Malformed as exc:
                    raise _broken(p, records[-1], str(exc), found) from exc
    except TorchkeepError:
        raise
    except OSError as exc:
        raise storage_error(exc, p, "read the file") from exc
    refused = [g for g in found if not is_allowed_global(g)]
    rebuilt = tuple(g for g in refused if g in SAFE_VALUE_GLOBALS)
    unsafe = [g for g in refused if g not in SAFE_VALUE_GLOBALS]
    if rebuilt and not unsafe:
        # Rebuilding is only offered to files whose _codecs calls are the ones pickle writes
        from torchkeep.format._pickle_codecs import check_codecs  # it imports this module

        try:
            check_codecs(p, zip_format=head == _ZIP_MAGIC)
        except UnsafeCheckpointError:
            unsafe.append("_codecs.encode")
    return PickleScan(
        path=p,
        records=tuple(records),
        globals=tuple(found),
        unsafe=tuple(unsafe),
        rebuilt=rebuilt,
    )
