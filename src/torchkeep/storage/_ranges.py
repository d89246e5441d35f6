"""Lazy remote buffers: byte ranges of one object fetched on first use, several at a time."""

from __future__ import annotations

import errno
import mmap
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from torchkeep.storage._errors import storage_error
from torchkeep.storage._upload import report

__all__ = ["BLOCK_BYTES", "IN_FLIGHT", "PAGE_BYTES", "PART_BYTES", "READ_BLOCK", "Ranges"]

PAGE_BYTES = 1 << 20
"""The unit of what is fetched and remembered: a range asked for is rounded out to pages."""
BLOCK_BYTES = 16 << 20
"""The most one request reads: a longer range goes as several requests, in flight together."""
PART_BYTES = 16 << 20
"""Uploads go up in parts of this size (S3 needs at least 5 MiB)."""
IN_FLIGHT = 4
"""Requests in flight per upload."""
READ_BLOCK = 1 << 20
"""The block of a file object opened for reading (format detection reads a few bytes)."""

_POOL = ThreadPoolExecutor(max_workers=16, thread_name_prefix="torchkeep-io")


class Ranges:
    """Fetches byte ranges of one object into its lazy buffer, by pages, several at a time.

    ``ranges(start, end)`` fetches the missing pages of its range now (in requests of at most
    ``BLOCK_BYTES``, all in flight at once) and returns when they are in. Nothing is read
    ahead on a guess: a load that needs a part of the object reads that part (rounded out to
    ``PAGE_BYTES``). A load that knows it goes through many ranges says so first with
    :meth:`prefetch`, which starts their requests in the background, so the link is kept busy.
    """

    def __init__(self, store: Any, path: str, buffer: mmap.mmap) -> None:
        self.store, self.path, self.buffer = store, path, buffer
        self.size = len(buffer)
        self.page = PAGE_BYTES
        self.have: set[int] = set()  # pages fetched
        self.pending: dict[int, Future[None]] = {}  # page -> the request that fetches it
        self.lock = threading.Lock()

    def __call__(self, start: int, end: int) -> None:
        with self.lock:
            wanted = self._schedule(start, end)
        for fut in wanted:
            fut.result()

    def prefetch(self, spans: Iterable[tuple[int, int]]) -> None:
        """Start fetching the ranges ``spans`` (``(start, end)`` pairs) in the background."""
        with self.lock:
            for start, end in sorted(spans):
                self._schedule(start, end)

    def _schedule(self, start: int, end: int) -> list[Future[None]]:
        """Requests for the missing pages of ``[start, end)``; the futures to wait for."""
        end = min(end, self.size)
        if start >= end:
            return []
        first, last = start // self.page, (end - 1) // self.page
        per_request = max(BLOCK_BYTES // self.page, 1)
        run: list[int] = []
        for p in range(first, last + 1):
            if p in self.have or p in self.pending:
                continue
            if run and (p != run[-1] + 1 or len(run) >= per_request):
                self._submit(run)
                run = []
            run.append(p)
        if run:
            self._submit(run)
        futures = (self.pending.get(p) for p in range(first, last + 1))
        return list({id(f): f for f in futures if f is not None}.values())

    def _submit(self, pages: list[int]) -> None:
        fut = _POOL.submit(self._fetch, pages[0], pages[-1] + 1)
        for p in pages:
            self.pending[p] = fut

    def _fetch(self, first: int, stop: int) -> None:
        lo, hi = first * self.page, min(stop * self.page, self.size)
        try:
            data = self.store.read_bytes(self.path, lo, hi - lo)
            if len(data) != hi - lo:
                raise storage_error(
                    OSError(errno.EIO, "short read"), self.path, "read the object", hint=None
                )
            self.buffer[lo:hi] = data
        except BaseException:
            with self.lock:  # a later read asks again
                for p in range(first, stop):
                    self.pending.pop(p, None)
            raise
        with self.lock:
            for p in range(first, stop):
                self.have.add(p)
                self.pending.pop(p, None)
        report("download", self.path, hi - lo, self.size)
