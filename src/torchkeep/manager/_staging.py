"""Host memory for overlapped snapshots: a bounded arena, device copies on a side stream, priority.

:class:`HostArena` is one block of host memory allocated once (pinned when the state is on a GPU)
and reused by every save; tensors are carved out of it at aligned offsets. With a
``staging_limit`` the block is that size, and a state that does not fit is staged in waves: the
staging thread writes what the arena holds into a pack, resets it and goes on.

:class:`DeviceCopies` copies one tensor into its host buffer. The copy goes through the device's
stream API (``torch.cuda`` or ``torch.cpu``, whose streams and events exist and complete at once),
so the same code runs on a CPU machine as on a GPU one: on CUDA the device-to-host copy runs on a
side stream after an event recorded on the compute stream at ``save()`` (everything queued before
the save is in the copy, nothing after), and its own event is synchronised before the copy counts
as done, so that a hook can let the optimizer step go on.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from dataclasses import dataclass
from typing import Any

import torch

ALIGN = 64  # bytes: every staged tensor starts on a cache line


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def nbytes_of(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass(slots=True)
class SnapshotStats:
    """What one overlapped save cost the loop, and how it was staged.

    Attributes:
        save_seconds: the time ``save()`` blocked (capture, flatten, the copies done at once).
        hook_seconds: the time hooks blocked the loop waiting for tensors of this save.
        sync_bytes: bytes copied in ``save()``; staged_bytes: bytes copied by the save thread.
        waves: packs written (more than one when the state exceeds ``staging_limit``).
    """

    save_seconds: float = 0.0
    hook_seconds: float = 0.0
    sync_bytes: int = 0
    staged_bytes: int = 0
    waves: int = 0


class HostArena:
    """A block of host memory handed out at aligned offsets; ``reset`` starts it over.

    Args:
        limit: the block's size in bytes, or ``None`` to size it to each save's state (grown, never
            shrunk, so that a run's saves reuse one block).
    """

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self._block: torch.Tensor | None = None
        self._pinned = False
        self._used = 0

    @property
    def capacity(self) -> int:
        return 0 if self._block is None else self._block.numel()

    def prepare(self, total: int, *, pin: bool) -> None:
        """Make the block ready for a save of ``total`` bytes (aligned sizes summed)."""
        size = self.limit if self.limit is not None else total
        if self._block is None or self.capacity < size or (pin and not self._pinned):
            self._block = None  # the old block goes before the new one is allocated
            pin = pin and torch.cuda.is_available()
            self._block = torch.empty(max(size, ALIGN), dtype=torch.uint8, pin_memory=pin)
            self._pinned = pin
        self._used = 0

    def fits(self, t: torch.Tensor) -> bool:
        return self._used + _aligned(nbytes_of(t)) <= self.capacity

    def carve(self, t: torch.Tensor) -> torch.Tensor:
        """A buffer of ``t``'s dtype and shape in the block; the caller checked :meth:`fits`."""
        assert self._block is not None
        n = nbytes_of(t)
        raw = self._block[self._used : self._used + n]
        self._used += _aligned(n)
        if n == 0:
            return torch.empty(t.shape, dtype=t.dtype)
        return raw.view(t.dtype).view(t.shape)

    def reset(self) -> None:
        self._used = 0

    def release(self) -> None:
        self._block = None
        self._used = 0


class DeviceCopies:
    """Copies of tensors into host buffers, on a side stream of each device they live on."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, Any] = {}
        self._ready: dict[torch.device, Any] = {}

    @staticmethod
    def _api(device: torch.device) -> Any:
        return torch.cuda if device.type == "cuda" else torch.cpu

    def mark_ready(self, devices: set[torch.device]) -> None:
        """At ``save()``, on the caller's thread: the point of each device's compute stream that
        the copies must see (everything queued before it, nothing after)."""
        self._ready = {}
        for device in devices:
            api = self._api(device)
            event = api.Event()
            event.record(api.current_stream(device) if device.type == "cuda" else None)
            self._ready[device] = event

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Copy ``src`` into ``dst`` and return once the bytes are in ``dst``."""
        device = src.device
        if device.type == "cpu" or device.type == "cuda":
            api = self._api(device)
            stream = self._streams.get(device)
            if stream is None:
                stream = self._streams[device] = (
                    api.Stream(device) if device.type == "cuda" else api.Stream()
                )
            ready = self._ready.get(device)
            if ready is not None:
                stream.wait_event(ready)
            done = api.Event()
            with api.stream(stream):
                copy_tensor(dst, src, non_blocking=device.type == "cuda")
                done.record(stream)
            done.synchronize()  # before the copy counts as done, and its hook lets a step go on
            return
        copy_tensor(dst, src, non_blocking=False)  # other devices: a plain blocking copy


@torch.no_grad()  # grad mode is per thread: the save thread's is on
def copy_tensor(dst: torch.Tensor, src: torch.Tensor, *, non_blocking: bool) -> None:
    try:
        dst.copy_(src, non_blocking=non_blocking)
    except (RuntimeError, NotImplementedError):  # dtypes without copy kernels: copy their bytes
        raw = src.contiguous().view(torch.uint8) if src.element_size() == 1 else None
        if raw is None:
            raise
        dst.view(torch.uint8).copy_(raw)


# -- priority of the background thread ------------------------------------------------------------

_IOPRIO_CLASS_SHIFT = 13
_IOPRIO_CLASS_BE = 2  # best effort, level 7 (the lowest): not idle, which a busy disk starves
_IOPRIO_WHO_PROCESS = 1
_SYS_IOPRIO_SET = {"x86_64": 251, "aarch64": 30}


def lower_priority(nice: int = 10, low_io: bool = True) -> list[str]:
    """Lower the calling thread's CPU priority (``nice``) and, on Linux, its I/O priority to the
    lowest of the best-effort class.

    On Linux both are per thread (``setpriority`` and ``ioprio_set`` on the thread id), so the
    training thread keeps its priority. Returns what was changed; what the system refuses is
    left as it was.
    """
    done: list[str] = []
    tid = threading.get_native_id()
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
        done.append(f"nice +{nice}")
    number = _SYS_IOPRIO_SET.get(os.uname().machine)
    if low_io and number is not None:
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            prio = _IOPRIO_CLASS_BE << _IOPRIO_CLASS_SHIFT | 7
            if libc.syscall(number, _IOPRIO_WHO_PROCESS, tid, prio) == 0:
                done.append("io best-effort 7")
    return done
