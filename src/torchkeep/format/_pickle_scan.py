"""List the Python globals a pickle would import, without unpickling it: the opcode walker.

Files written by ``torch.save`` are pickles: torch's zip format keeps one in ``<archive>/data.pkl``,
the legacy format is five pickles in a row followed by raw storage bytes, and some files are a
bare pickle. Unpickling any of them may import and call whatever the file names (``os.system``,
``builtins.eval``...). This module walks the opcodes with :func:`pickletools.genops` and never
executes or unpickles anything: it reports every ``module.qualname`` a pickle would import
(``GLOBAL``, ``INST``, and ``STACK_GLOBAL`` with its operands resolved through a small model of
the stack and memo). Which of them torch's ``weights_only`` unpickler would refuse is
:mod:`._pickle_allow`'s; reading files and zip archives (``scan_file``) is :mod:`._pickle_files`'s.

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
or two rather than scanned for minutes.
"""

from __future__ import annotations

import copyreg
import io
import pickletools
import struct
import time
import warnings
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from typing import IO, Any, cast

from torchkeep.errors import CorruptCheckpointError, TorchkeepError, UnsafeCheckpointError
from torchkeep.format._pickle_allow import is_allowed_global

__all__ = ["UNRESOLVED", "scan_pickle_bytes"]

UNRESOLVED = "<unresolved STACK_GLOBAL>"
MAX_RECORD_BYTES = 512 * 1024 * 1024  # a data.pkl holds structure only; tensors live elsewhere
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
_STRING_OPS = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"}
    | {"STRING", "BINSTRING", "SHORT_BINSTRING"}
)
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_EXT_OPS = frozenset({"EXT1", "EXT2", "EXT4"})
_PARSE_ERRORS = (ValueError, EOFError, OverflowError, struct.error)
_MARK = object()
_UNKNOWN = object()
_HINT_CORRUPT = "the file is damaged or is not a PyTorch checkpoint; re-download or re-save it"
_HINT_UNSAFE = (
    "do not load this file; a pickle that breaks off after importing code is an attack pattern"
)


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
