"""Reading tensor bytes from their file straight into a parameter: loads at one copy of memory.

Every safetensors file torchkeep opens (a single file, a run's pack, a shard) is mapped
copy-on-write, and its tensors point into that mapping. Copying such a tensor into a parameter
would bring its pages into memory beside the parameter: two copies at the peak. Instead,
:class:`DirectReads` finds the file a source tensor was cut from and reads the bytes from the
file into the parameter's own memory (``os.preadv``), or, when it cannot (another dtype, a
parameter on the GPU), lets the caller copy and then drops the tensor's pages.

Why a registry of live mappings rather than the reader object: a run's packs are opened inside
``RunReader.load`` and only the tensors come out. Each mapping is remembered by address with a
weak reference to its ``mmap``, so an entry lives exactly as long as a tensor (or reader) keeps
the mapping alive, and an address is never matched after its mapping is gone.

Only for tensors just loaded and not written to: a page changed in memory (copy-on-write) is
not what the file holds. Callers (``load_into``, ``restore``) pass what they loaded themselves.
"""

from __future__ import annotations

import mmap
import os
import threading
import weakref
from dataclasses import dataclass
from types import TracebackType

import torch

from torchkeep.format._safetensors import MappedFile, read_into


@dataclass(frozen=True, slots=True)
class _Live:
    path: str
    identity: tuple[int, int]
    addr: int
    size: int
    map: weakref.ref[mmap.mmap]


_LIVE: dict[int, _Live] = {}
_LOCK = threading.Lock()
# Addresses whose mapping was collected. The weakref callback only appends here (atomic, no
# lock): the collector may run it on a thread that holds _LOCK, and taking _LOCK there would
# deadlock. Entries are purged under _LOCK by the next track or lookup.
_DEAD: list[int] = []


def _purge() -> None:
    """Forget the entries whose mapping is gone; the caller holds ``_LOCK``."""
    while _DEAD:
        addr = _DEAD.pop()
        entry = _LIVE.get(addr)
        if entry is not None and entry.map() is None:  # not a new mapping at the same address
            del _LIVE[addr]


def track(mapped: MappedFile) -> None:
    """Remember ``mapped`` (by address) for as long as its mapping is alive."""
    m = mapped._map  # the reader's mapping; torchkeep's own module, read only
    identity = mapped.identity
    if not isinstance(m, mmap.mmap) or identity is None:
        return  # nothing mapped (an empty file), or a store's buffer: no file to read from
    addr = mapped._addr

    def gone(_: object) -> None:
        _DEAD.append(addr)

    with _LOCK:
        _purge()
        _LIVE[addr] = _Live(mapped.path, identity, addr, mapped.size, weakref.ref(m, gone))


def _find(t: torch.Tensor) -> tuple[_Live, mmap.mmap, int] | None:
    """The live mapping ``t`` was cut from, the mapping, and ``t``'s offset in the file."""
    if t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0:
        return None
    ptr, nbytes = t.data_ptr(), t.numel() * t.element_size()
    with _LOCK:
        _purge()
        entries = list(_LIVE.values())
    for entry in entries:
        m = entry.map()
        if m is not None and entry.addr <= ptr and ptr + nbytes <= entry.addr + entry.size:
            return entry, m, ptr - entry.addr
    return None


class DirectReads:
    """``read(src, dst)`` and ``release(src)`` for one load; files stay open until it ends.

    With ``read=False`` nothing is read from the files: the caller copies from the mapping
    (``copy_`` uses several cores, one ``preadv`` one) and ``release`` then drops the pages,
    so the peak is one copy plus one tensor. ``restore`` does that: a run's packs were just
    hashed (``verify``), their pages are in memory already, and copying them is faster.
    """

    def __init__(self, *, read: bool = True) -> None:
        self._files: dict[str, int | None] = {}
        self._read = read

    def _fd(self, entry: _Live) -> int | None:
        if entry.path not in self._files:
            fd: int | None
            try:
                fd = os.open(entry.path, os.O_RDONLY)
            except OSError:
                fd = None
            if fd is not None:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != entry.identity:  # replaced since it was mapped
                    os.close(fd)
                    fd = None
            self._files[entry.path] = fd
        return self._files[entry.path]

    def read(self, src: torch.Tensor, dst: torch.Tensor) -> bool:
        """Read ``src``'s bytes from its file into ``dst``; False when that cannot be done."""
        if not self._read or dst.device.type != "cpu" or not dst.is_contiguous():
            return False
        if src.dtype != dst.dtype or src.shape != dst.shape:
            return False
        found = _find(src)
        if found is None:
            return False
        entry, _, offset = found
        fd = self._fd(entry)
        if fd is None:
            return False
        read_into(fd, offset, src.numel() * src.element_size(), dst, path=entry.path)
        return True

    def release(self, src: torch.Tensor) -> None:
        """Drop the mapped pages of ``src`` (read again from disk if used again)."""
        found = _find(src)
        if found is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        _, m, offset = found
        # Only pages wholly inside ``src``: a neighbour in the same page (another app entry of
        # a run's pack) may have been written to since, and dropping its page would lose that.
        start = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE
        end = (offset + src.numel() * src.element_size()) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > start:
            m.madvise(mmap.MADV_DONTNEED, start, end - start)

    def __enter__(self) -> DirectReads:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for fd in self._files.values():
            if fd is not None:
                os.close(fd)
        self._files.clear()
