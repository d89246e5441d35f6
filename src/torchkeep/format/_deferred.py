"""Deferred reads: a load of part of a remote checkpoint fetches only the tensors it uses.

A remote pack (or single file) is mapped as empty memory whose byte ranges are downloaded on
demand (``storage/_ranges.py``). A reader that cuts every tensor of the checkpoint at once, and
hashes each (``verify``), would download all of it before ``load_into`` has chosen the part it
needs. So, inside :func:`deferring`, the readers that can (``SafetensorsFile.load``,
``RunReader.load``, on remote objects only) cut each tensor without fetching its bytes and
register it here with the check of its recorded hash. The caller then chooses the tensors it
uses and calls :meth:`Deferred.materialize` on them, which downloads their ranges (all started
at once) and checks each against its hash, raising the reader's own
:class:`~torchkeep.errors.CorruptCheckpointError` for a damaged one, before any is copied. The
tensors never materialized are dropped with the load, never read and never verified: they
were never used.

Only the caller that made the :class:`Deferred` sees its tensors, and it must materialize every
tensor it hands on or copies from (``state/_loading.py`` does, for the keys a load copies): a
deferred tensor's memory holds zeros until then. Local files are never deferred (their pages
come from the mapped file when touched), so local loads are unchanged.

Tensors are told apart by the address of their storage: each tensor cut from a mapping has a
storage of its own, and views and ``nn.Parameter`` wrappers share it. A registered tensor is
kept alive here, so no other memory can take its address while it is pending.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch

from torchkeep.format._safetensors import MappedFile

Check = Callable[[torch.Tensor], None]
"""Raises ``CorruptCheckpointError`` when the fetched bytes of a tensor are not as recorded."""


@dataclass
class _Slot:
    """What a context variable holds: emptied on exit, because contexts copied meanwhile live on.

    asyncio copies the caller's context into every callback it schedules, so fsspec's event
    loop thread (a daemon) keeps copies of it. Were the :class:`Deferred` itself in the variable,
    those copies would keep its tensors alive until that thread clears them while Python shuts
    down, and a tensor freed then aborts the process ("terminate called without an active
    exception"). The copies keep only the emptied slot.
    """

    deferred: Deferred | None


_CURRENT: ContextVar[_Slot | None] = ContextVar("torchkeep_deferred", default=None)


@contextlib.contextmanager
def _holding(var: ContextVar[_Slot | None], deferred: Deferred) -> Iterator[None]:
    slot = _Slot(deferred)
    token = var.set(slot)
    try:
        yield
    finally:
        slot.deferred = None
        var.reset(token)


@contextlib.contextmanager
def deferring() -> Iterator[Deferred]:
    """Readers called inside defer the fetch (and hash check) of remote tensors to the caller."""
    deferred = Deferred()
    with _holding(_CURRENT, deferred):
        yield deferred


def current() -> Deferred | None:
    """The :class:`Deferred` of the enclosing :func:`deferring`, if any."""
    slot = _CURRENT.get()
    return None if slot is None else slot.deferred


_USED: ContextVar[_Slot | None] = ContextVar("torchkeep_deferred_used", default=None)


@contextlib.contextmanager
def handing_on(deferred: Deferred) -> Iterator[None]:
    """Tell the code that hands a deferred load's state on (``state.restore_app``, several
    layers down from ``CheckpointManager.restore``) which tensors it must materialize first.
    Readers ignore this: loads inside it are not deferred."""
    with _holding(_USED, deferred):
        yield


def handed_on() -> Deferred | None:
    """The :class:`Deferred` of the enclosing :func:`handing_on`, if any."""
    slot = _USED.get()
    return None if slot is None else slot.deferred


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@dataclass(frozen=True, slots=True)
class _Pending:
    tensor: torch.Tensor  # the tensor as cut (kept alive: its address stays its own)
    mapped: MappedFile | None
    start: int
    end: int
    check: Check | None
    source: torch.Tensor | None = None  # a copy of this other deferred tensor


class Deferred:
    """The tensors of one load whose bytes are fetched, and checked, only when used."""

    def __init__(self) -> None:
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._pending)

    def add(
        self, t: torch.Tensor, mapped: MappedFile, start: int, end: int, check: Check | None
    ) -> None:
        """Register ``t``, cut unfetched from bytes ``[start, end)`` of ``mapped``."""
        if t.numel() == 0 or t.device.type != "cpu":
            if check is not None:
                check(t)  # nothing to fetch: check now
            return
        with self._lock:
            self._pending[_key(t)] = _Pending(t, mapped, start, end, check)

    def copy_of(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor of its own memory with ``t``'s bytes, made when it is materialized."""
        with self._lock:
            if _key(t) not in self._pending or not t.is_contiguous():
                self.materialize([t])
                return t.clone()
            dup = torch.empty_like(t, memory_format=torch.contiguous_format)
            self._pending[_key(dup)] = _Pending(dup, None, 0, 0, None, source=t)
            return dup

    def materialize(self, tensors: Iterable[Any]) -> None:
        """Fetch and check the deferred tensors among ``tensors`` (others are left alone).

        Raises:
            CorruptCheckpointError: a tensor's bytes do not match its recorded hash.
        """
        with self._lock:
            found: dict[int, _Pending] = {}
            for t in tensors:
                if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                    p = self._pending.get(_key(t))
                    while p is not None:
                        found.setdefault(_key(p.tensor), p)
                        p = None if p.source is None else self._pending.get(_key(p.source))
            if not found:
                return
            spans: dict[int, tuple[MappedFile, list[tuple[int, int]]]] = {}
            for p in found.values():
                if p.mapped is not None:
                    spans.setdefault(id(p.mapped), (p.mapped, []))[1].append((p.start, p.end))
            for mapped, ranges in spans.values():
                mapped.prefetch(ranges)  # all requests in flight at once
            for p in found.values():
                self._ready(p)

    def materialize_tree(self, obj: Any) -> None:
        """:meth:`materialize` every tensor in the containers of ``obj``."""
        tensors: list[torch.Tensor] = []
        stack = [obj]
        while stack:
            node = stack.pop()
            if isinstance(node, torch.Tensor):
                tensors.append(node)
            elif isinstance(node, Mapping):
                stack.extend(node.values())
            elif isinstance(node, list | tuple | set):
                stack.extend(node)
        self.materialize(tensors)

    def _ready(self, p: _Pending) -> None:
        key = _key(p.tensor)
        if key not in self._pending:
            return  # done already
        if p.source is not None:
            source = self._pending.get(_key(p.source))
            if source is not None:
                self._ready(source)
            p.tensor.copy_(p.source)
        elif p.mapped is not None:
            p.mapped.fetch(p.start, p.end)
            if p.check is not None:
                p.check(p.tensor)
        del self._pending[key]  # only once fetched and checked: a failure is raised again
