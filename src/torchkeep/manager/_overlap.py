"""Overlapped snapshots: ``save()`` returns at once, and the copy to host memory runs meanwhile.

The weights do not change between the end of one optimizer step and the next, so the copy can
run while the next forward and backward compute (CheckFreq, FAST '21). At ``save()``, on the
caller's thread: every tensor's ``_version`` is recorded; tensors below ``SYNC_BYTES`` (step
counts, RNG states) and tensors that no hook guards (frozen parameters, an EMA copy, plain
tensors of the app) are copied at once, so they cannot race. The rest, the guarded tensors, are
copied by the save thread, in the order hooks will need them: a forward pre-hook on each module
with buffers (BatchNorm's running statistics change in its forward) and a step pre-hook on each
optimizer of the app (its parameters and its state change in ``step``). A hook waits only for the
tensors of its module or optimizer, and moves them to the front of the queue.

Exactness is checked, not assumed: a tensor whose ``_version`` differs from the one recorded at
``save()``, before or right after its copy, was changed in place meanwhile (a manual
``p.add_()``, an update outside the guarded calls); its copy is not the state at ``save()``, so
the save fails with :class:`SnapshotChangedError` naming the tensor, and nothing is committed.
(Some kernels change a tensor without bumping its version, BatchNorm's running statistics
among them: those are guarded by their module's hook.)
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchkeep.errors import InvalidArgumentError, SnapshotChangedError
from torchkeep.format import Flattened, Manifest
from torchkeep.manager._aftercommit import BackgroundSaves
from torchkeep.manager._staging import (
    ALIGN,
    DeviceCopies,
    HostArena,
    SnapshotStats,
    copy_tensor,
    lower_priority,
    nbytes_of,
)
from torchkeep.manager._waves import PackWaves
from torchkeep.manager._writer import Hasher, Stager

SYNC_BYTES = 64 * 1024  # smaller tensors are copied in save(): overlapping them gains nothing

Flush = Callable[[dict[str, torch.Tensor]], None]


@dataclass(slots=True)
class _Entry:
    key: str
    source: torch.Tensor | None
    version: int
    nbytes: int
    done: bool = False


@dataclass(slots=True)
class Snapshot:
    """The state of one save while it is copied into host memory."""

    step: int
    skeleton: Any
    entries: dict[str, _Entry]
    groups: dict[int, list[str]]  # id of a module or optimizer -> keys of the tensors it changes
    queue: deque[str]
    queued: frozenset[str] = frozenset()
    stats: SnapshotStats = field(default_factory=SnapshotStats)
    staged: dict[str, torch.Tensor] = field(default_factory=dict)
    error: SnapshotChangedError | None = None
    finished: bool = False
    cond: threading.Condition = field(default_factory=threading.Condition)

    # -- the loop's side ---------------------------------------------------------------------

    def need(self, keys: Iterable[str]) -> None:
        """Block until these tensors are copied (they go to the front of the queue)."""
        with self.cond:
            wanted = [k for k in keys if not self.entries[k].done]
            if not wanted or self.finished:
                return
            start = time.perf_counter()
            for key in reversed(wanted):
                self.queue.appendleft(key)  # copied next; its old place is skipped as done
            self.cond.notify_all()
            while not self.finished and not all(self.entries[k].done for k in wanted):
                self.cond.wait()
            self.stats.hook_seconds += time.perf_counter() - start

    def need_all(self) -> None:
        self.need(list(self.entries))

    # -- the save thread's side --------------------------------------------------------------

    def check(self, entry: _Entry, when: str) -> None:
        source = entry.source
        if source is None or source._version == entry.version:
            return
        if self.error is None:
            self.error = SnapshotChangedError(
                f"tensor {entry.key!r} was changed in place after save({self.step}) was called, "
                f"{when} to host memory (its version went from {entry.version} to "
                f"{source._version}), by code outside the optimizer steps and module forwards "
                f"that the save guards; step {self.step} was not saved, since its checkpoint "
                "would not hold the state at save()",
                key=entry.key,
                expected=entry.version,
                actual=source._version,
                hint="change it after mgr.wait_staged() (which returns once the save's tensors "
                "are in host memory), or save with overlap=False",
            )

    def run(self, arena: HostArena, copies: DeviceCopies, flush: Flush) -> dict[str, torch.Tensor]:
        """Copy every queued tensor (on the save thread), flushing a wave when the arena is full;
        returns the last wave (not flushed) with the tensors copied in ``save()``."""
        wave: dict[str, torch.Tensor] = {}
        try:
            while True:
                with self.cond:
                    while self.queue and self.entries[self.queue[0]].done:
                        self.queue.popleft()
                    if not self.queue or self.error is not None:
                        break
                    entry = self.entries[self.queue.popleft()]
                assert entry.source is not None
                if not arena.fits(entry.source):
                    flush(wave)  # the hooks waiting meanwhile are the stall of a bounded save
                    wave = {}
                    arena.reset()
                buf = arena.carve(entry.source)
                self.check(entry, "before it was copied")
                copies.copy(buf, entry.source)
                self.check(entry, "while it was copied")
                with self.cond:
                    entry.done = True
                    entry.source = None  # the snapshot holds no reference to live tensors
                    self.stats.staged_bytes += entry.nbytes
                    self.cond.notify_all()
                wave[entry.key] = self.staged[entry.key] = buf
        finally:
            with self.cond:
                self.finished = True
                for e in self.entries.values():
                    e.source = None
                self.cond.notify_all()
        if self.error is not None:
            raise self.error
        return {**{k: v for k, v in self.staged.items() if k not in self.queued}, **wave}


class Overlap:
    """The hooks of a manager's overlapped saves, and the snapshot they guard.

    Hooks are registered once per optimizer and module (at the first save that holds them) and
    removed by :meth:`close`; between saves they return at once.
    """

    def __init__(
        self, staging_limit: int | None, *, async_save: bool, overlap: bool, distributed: bool
    ) -> None:
        if (overlap or staging_limit is not None) and not async_save:
            raise InvalidArgumentError(
                "overlap= and staging_limit= apply to async saves only",
                hint="add async_save=True to the CheckpointManager",
            )
        if (overlap or staging_limit is not None) and distributed:
            raise InvalidArgumentError(
                "overlap= and staging_limit= are not supported in a torch.distributed job yet",
                hint="use async_save=True alone: the loop then waits only for the host copy",
            )
        self.active = overlap or staging_limit is not None
        self.overlap = overlap
        if staging_limit is not None and (
            isinstance(staging_limit, bool)
            or not isinstance(staging_limit, int)
            or staging_limit <= 0
        ):
            raise InvalidArgumentError(
                f"staging_limit must be a positive number of bytes, not {staging_limit!r}",
                hint="for example staging_limit=2**30 for 1 GiB of host memory, or None",
            )
        self.arena = HostArena(staging_limit)
        self.copies = DeviceCopies()
        # Hashing and writing run at a lower CPU and I/O priority than the loop (measured in
        # benchmarks/writer_cost.py); the copies, which hooks may wait for, do not.
        self.hasher = Hasher(initializer=lower_priority)
        self.writer: ThreadPoolExecutor | None = None
        self.current: Snapshot | None = None
        self.last_stats: SnapshotStats | None = None
        self._handles: dict[int, tuple[weakref.ref[Any], Any]] = {}

    def _hook(self, owner: Any) -> None:
        snapshot = self.current
        if snapshot is None or snapshot.finished:
            return
        keys = snapshot.groups.get(id(owner))
        if keys:
            snapshot.need(keys)

    def _register(self, owner: nn.Module | torch.optim.Optimizer) -> None:
        known = self._handles.get(id(owner))
        if known is not None and known[0]() is owner:
            return
        ref = weakref.ref(owner)
        if isinstance(owner, torch.optim.Optimizer):
            handle = owner.register_step_pre_hook(lambda opt, args, kwargs: self._hook(opt))
        else:
            handle = owner.register_forward_pre_hook(lambda mod, args: self._hook(mod))
        self._handles[id(owner)] = (ref, handle)

    def start(self, step: int, flat: Flattened, app: Mapping[str, Any]) -> Snapshot:
        """On the caller's thread: record versions, copy the small and unguarded tensors, queue
        the guarded ones (those the hooks will need first go first)."""
        started = time.perf_counter()
        groups, order = self._guards(app, flat.tensors)
        limit = self.arena.limit
        entries: dict[str, _Entry] = {}
        now: list[str] = []
        for key, t in flat.tensors.items():
            entries[key] = _Entry(key, t, t._version, nbytes_of(t))  # copied under no_grad
            if key not in order or entries[key].nbytes < SYNC_BYTES or t.device.type == "meta":
                now.append(key)
            elif limit is not None and nbytes_of(t) > limit:
                raise InvalidArgumentError(
                    f"tensor {key!r} ({nbytes_of(t)} bytes) is larger than staging_limit "
                    f"({limit} bytes), so it cannot be staged",
                    key=key,
                    hint=f"raise staging_limit to at least {nbytes_of(t)}, or pass None",
                )
        synced = set(now)
        queued = [k for k in order if k not in synced]
        snapshot = Snapshot(step, flat.skeleton, entries, groups, deque(queued), frozenset(queued))
        total = sum(-(-entries[k].nbytes // ALIGN) * ALIGN for k in queued)
        pin = any(t.is_cuda for t in flat.tensors.values())
        self.arena.prepare(total, pin=pin)
        self.copies.mark_ready({t.device for t in flat.tensors.values()})
        for key in now:  # a private copy each: the arena is for the staged ones
            entry = entries[key]
            assert entry.source is not None
            buf = torch.empty(entry.source.shape, dtype=entry.source.dtype)
            if entry.source.device.type == "cpu":
                copy_tensor(buf, entry.source, non_blocking=False)  # no stream to wait for
            else:
                self.copies.copy(buf, entry.source)
            snapshot.staged[key] = buf
            entry.done, entry.source = True, None
            snapshot.stats.sync_bytes += entry.nbytes
        snapshot.stats.save_seconds = time.perf_counter() - started
        self.current = snapshot
        return snapshot

    def _guards(
        self, app: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
    ) -> tuple[dict[int, list[str]], list[str]]:
        """Which tensors each hooked module and optimizer changes, and the queue's order."""
        by_storage: dict[int, list[str]] = {}
        for key, t in tensors.items():
            if t.device.type != "meta" and t.numel():
                by_storage.setdefault(t.untyped_storage().data_ptr(), []).append(key)

        def keys_of(ts: Iterable[torch.Tensor]) -> list[str]:
            out: list[str] = []
            for t in ts:
                if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.numel():
                    out += by_storage.get(t.untyped_storage().data_ptr(), [])
            return out

        groups: dict[int, list[str]] = {}
        for value in app.values():
            if isinstance(value, nn.Module):
                for module in value.modules():
                    buffers = [b for b in module._buffers.values() if b is not None]
                    keys = keys_of(buffers)
                    if keys:
                        self._register(module)
                        groups[id(module)] = keys
        for value in app.values():
            if isinstance(value, torch.optim.Optimizer):
                params = [p for g in value.param_groups for p in g["params"]]
                states = [v for s in value.state.values() for v in s.values()]
                keys = keys_of([*params, *states])
                if keys:
                    self._register(value)
                    groups[id(value)] = keys
        order = list(dict.fromkeys(k for keys in groups.values() for k in keys))
        return groups, order

    def finish(self, snapshot: Snapshot) -> None:
        self.last_stats = snapshot.stats
        if self.current is snapshot:
            self.current = None

    def write(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the writer thread (lowered priority) and wait for it."""
        if self.writer is None:
            self.writer = ThreadPoolExecutor(
                1, thread_name_prefix="torchkeep-write", initializer=lower_priority
            )
        self.writer.submit(fn).result()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.shutdown(wait=True)
            self.writer = None
        self.hasher.close()
        for ref, handle in self._handles.values():
            if ref() is not None:
                handle.remove()
        self._handles = {}
        self.current = None
        self.arena.release()


def write_snapshot(
    snapshot: Snapshot,
    overlap: Overlap,
    root: Path,
    committed: list[Manifest],
    commit: dict[str, Any],
) -> Manifest:
    """On the save thread: stage ``snapshot`` wave by wave into packs, then commit its manifest."""
    waves = PackWaves(root, snapshot.step, committed)
    hashes = overlap.hasher.hashes

    def flush(wave: dict[str, torch.Tensor]) -> None:
        if wave:
            overlap.write(lambda: waves.write_wave(wave, hashes(wave)))
        snapshot.stats.waves += 1

    try:
        flush(snapshot.run(overlap.arena, overlap.copies, flush))
        return waves.commit(snapshot.skeleton, **commit)
    except BaseException:
        waves.abort()
        raise
    finally:
        overlap.finish(snapshot)


class OverlapMethods:
    """The manager's async staging and its methods for overlapped saves (``CheckpointManager``
    inherits them)."""

    root: Path
    _overlap: Overlap
    _hasher: Hasher
    _stager: Stager
    _background: BackgroundSaves[Any]
    _write: Callable[..., Any]

    @property
    def overlap(self) -> bool:
        """Whether async saves overlap their copy with the next steps."""
        return self._overlap.overlap

    def _submit(
        self,
        write: Callable[..., Any],
        step: int,
        flat: Flattened,
        app: Mapping[str, Any],
        *info: dict[str, Any],
    ) -> None:
        """Stage ``flat`` to host memory and start ``write`` (``_write``, or rank 0's commit in
        a job) on the save thread."""
        if not self._overlap.active:  # one copy of everything, here
            staged = self._stager.stage(flat)
            self._background.submit(write, step, staged, *info)
            return
        snapshot = self._overlap.start(step, flat, app)
        self._background.submit(write, step, snapshot, *info)
        if not self._overlap.overlap:
            self.wait_staged()  # staging_limit alone: save() returns once all is staged

    def _write_snapshot(
        self, snapshot: Snapshot, committed: list[Manifest], commit: dict[str, Any]
    ) -> Manifest:
        return write_snapshot(snapshot, self._overlap, self.root, committed, commit)

    def wait_staged(self) -> None:
        """Return once every tensor of a pending async save is in host memory (its write may go
        on): from then on, changing tensors in place cannot spoil it. Without a pending
        overlapped save, returns at once."""
        snapshot = self._overlap.current
        if snapshot is not None:
            snapshot.need_all()

    @property
    def snapshot_stats(self) -> SnapshotStats | None:
        """What the latest overlapped (or bounded) async save cost the loop: the time ``save()``
        blocked, the time hooks blocked, bytes copied at once and in the background, waves."""
        snapshot = self._overlap.current
        return snapshot.stats if snapshot is not None else self._overlap.last_stats
