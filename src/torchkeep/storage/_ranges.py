"""Lazy remote buffers: byte ranges of one object fetched on first use, several at a time."""

from __future__ import annotations

import errno
import mmap
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from torchkeep.storage._errors import storage_error
from torchkeep.storage._upload import report

__all__ = ["BLOCK_BYTES", "IN_FLIGHT", "PART_BYTES", "READ_BLOCK", "Ranges"]

BLOCK_BYTES = 16 << 20
"""Ranged reads fetch blocks of this size."""
READ_AHEAD = 2
"""Blocks read ahead of the last one asked for (at most this much more than needed is read)."""
PART_BYTES = 16 << 20
"""Uploads go up in parts of this size (S3 needs at least 5 MiB)."""
IN_FLIGHT = 4
"""Requests in flight per upload, and blocks read ahead per object."""
READ_BLOCK = 1 << 20
"""The block of a file object opened for reading (format detection reads a few bytes)."""

_POOL = ThreadPoolExecutor(max_workers=16, thread_name_prefix="torchkeep-io")


class Ranges:
    """Fetches byte ranges of one object into its lazy buffer, in blocks, several at a time.

    Each call fetches the missing blocks of its range at once, and starts reading the next
    ``IN_FLIGHT`` blocks ahead in the background, so that a load that goes through the object
    tensor by tensor keeps requests in flight, while one that needs a part reads little more.
    """

    def __init__(self, store: Any, path: str, buffer: mmap.mmap) -> None:
        self.store, self.path, self.buffer = store, path, buffer
        self.size = len(buffer)
        self.blocks = -(-self.size // BLOCK_BYTES)
        self.have: set[int] = set()
        self.pending: dict[int, Future[None]] = {}
        self.lock = threading.Lock()

    def __call__(self, start: int, end: int) -> None:
        end = min(end, self.size)
        if start >= end:
            return
        first, last = start // BLOCK_BYTES, (end - 1) // BLOCK_BYTES
        with self.lock:
            wanted = [self._start(b) for b in range(first, last + 1) if b not in self.have]
            for b in range(last + 1, min(last + 1 + READ_AHEAD, self.blocks)):
                if b not in self.have:  # read ahead: a load goes on through the object
                    self._start(b)
        for b, fut in wanted:
            fut.result()
            with self.lock:
                self.have.add(b)
                self.pending.pop(b, None)

    def _start(self, block: int) -> tuple[int, Future[None]]:
        fut = self.pending.get(block)
        if fut is None:
            fut = self.pending[block] = _POOL.submit(self._fetch, block)
        return block, fut

    def _fetch(self, block: int) -> None:
        lo = block * BLOCK_BYTES
        hi = min(lo + BLOCK_BYTES, self.size)
        data = self.store.read_bytes(self.path, lo, hi - lo)
        if len(data) != hi - lo:
            raise storage_error(
                OSError(errno.EIO, "short read"), self.path, "read the object", hint=None
            )
        self.buffer[lo:hi] = data
        report("download", self.path, hi - lo, self.size)
