"""The `Storage` protocol: everything torchkeep does to bytes, and what each call guarantees.

Paths are ``str``, not ``pathlib.Path``: a location may be ``s3://bucket/run``, which ``Path``
would mangle (``s3:/bucket/run``); a URL must reach its store as it was written. Local callers
may pass a ``Path``: :class:`~torchkeep.storage.LocalStorage` accepts any path-like.

Failures. Writes, deletes, listings and locks raise :class:`~torchkeep.errors.StorageError`,
built by :func:`~torchkeep.storage.storage_error` from the errno so that every store gives the same
hint. ``open_read``, ``map`` and ``size`` raise ``OSError`` unchanged (``FileNotFoundError`` for a
missing file): their callers know what the file is, and turn a missing pack into
``CheckpointPrunedError`` or a missing checkpoint into ``CheckpointNotFoundError``.

Reads that stay path-based. ``torch.load(path, mmap=True)`` needs a real file: torch maps it
itself, and a file object would make it read everything into memory. Locally the path is that
file, so ``format/_torchfile.py`` hands paths to ``torch.load``. A remote store must instead fetch
the object to a local temporary file first (``map`` does exactly that and keeps the copy alive
for as long as the mapping), then hand torch that path.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import BinaryIO, Protocol, runtime_checkable

__all__ = ["Lock", "Mapped", "Storage"]


@dataclass(frozen=True, slots=True)
class Mapped:
    """A whole file as one buffer, for zero-copy tensors (``torch.frombuffer``)."""

    buffer: mmap.mmap | bytearray | None
    """Writable (copy-on-write locally: writes never reach the file); ``None`` for an empty file."""
    size: int
    """The file's size in bytes when it was mapped."""
    identity: tuple[int, int] | None
    """``(st_dev, st_ino)`` of the file mapped, to check that a reopened path is the same file;
    ``None`` where a store has no such notion."""
    fetch: Callable[[int, int], None] | None = None
    """For a lazily read remote object: ``fetch(start, end)`` makes the bytes ``[start, end)``
    of ``buffer`` valid (downloading them if need be); call it before reading them. ``None``
    where the whole buffer is valid already (a local mapping)."""
    prefetch: Callable[[Iterable[tuple[int, int]]], None] | None = None
    """With ``fetch``: start downloading the ``(start, end)`` ranges given in the background, for
    a reader about to go through them (``fetch`` then waits for what is under way)."""


@runtime_checkable
class Lock(Protocol):
    """An exclusive writer lock, dropped by :meth:`release` or when the holder dies."""

    def acquire(self) -> None:
        """Take the lock now or raise ``RunLockedError`` (never waits)."""
        ...

    def release(self) -> None:
        """Drop the lock; a lock not held is not an error."""
        ...

    @property
    def held(self) -> bool:
        """True between a successful :meth:`acquire` and :meth:`release`."""
        ...


@runtime_checkable
class Storage(Protocol):
    """A place to keep files, each one committed atomically."""

    # -- committing ------------------------------------------------------------------------------

    def write_atomic(
        self, path: str, write: Callable[[BinaryIO], None], *, sequential: bool = False
    ) -> None:
        """Write a file so that readers see either the old content or the complete new one.

        ``write`` fills a seekable file; with ``sequential``, the caller promises that ``write``
        only calls ``write()`` and ``tell()``, so that a remote store may stream the bytes up as
        they come (a multipart upload) instead of spooling them to a local file first. Durable when it returns; if ``write`` raises or the
        process dies, the old content stays. ``StorageError.committed`` says the new file is in
        place but its durability could not be confirmed. Missing parents are created.
        """
        ...

    def create_exclusive(self, path: str, write: Callable[[BinaryIO], None]) -> bool:
        """As :meth:`write_atomic`, only if ``path`` does not exist; False (and no change) if it
        does. Never shows a partial file, and of two racing creators exactly one wins."""
        ...

    def append(self, path: str, data: bytes, *, durable: bool = False) -> None:
        """Append all of ``data`` or none of it (a failed write is truncated back). Durable only
        with ``durable``. Raises ``OSError`` unchanged, so that the caller can retry later."""
        ...

    def staging_directory(self, dest: str) -> AbstractContextManager[str]:
        """A private, hidden directory beside ``dest`` to build files in; removed at exit."""
        ...

    def publish(self, files: Sequence[str], directory: str) -> list[str]:
        """Move staged ``files`` into ``directory`` under their names, durably, in order: the
        last one is the commit point, so it must be the one that refers to the others."""
        ...

    def makedirs(self, path: str) -> None:
        """Create a directory and its parents; an existing directory is fine."""
        ...

    # -- reading ---------------------------------------------------------------------------------

    def open_read(self, path: str) -> BinaryIO:
        """A seekable binary file for reading; the caller closes it."""
        ...

    def read_bytes(self, path: str, start: int | None = None, length: int | None = None) -> bytes:
        """The file's bytes, or ``length`` bytes (fewer at the end) from ``start``."""
        ...

    def map(self, path: str) -> Mapped:
        """The whole file as one buffer, read lazily where the store can (mmap locally)."""
        ...

    def size(self, path: str) -> int:
        """The file's size in bytes."""
        ...

    def exists(self, path: str) -> bool:
        """True when a committed file or directory exists at ``path``."""
        ...

    # -- removing --------------------------------------------------------------------------------

    def delete(self, path: str) -> None:
        """Remove a file, never what a link points to; a missing file is not an error."""
        ...

    def delete_files(
        self,
        directory: str,
        names: Iterable[str],
        *,
        check: Callable[[BinaryIO], bool] | None = None,
        action: str = "delete the files",
        grace: bool = False,
    ) -> list[str]:
        """Remove ``names`` from ``directory``, durably (one directory sync at the end), and
        return those removed. With ``grace``, files another process wrote are kept until the
        store's grace period has passed: on a remote store, a writer whose lease expired may
        still be about to commit a manifest that refers to them (locally the lock dies with its
        writer, so nothing is kept). Confined: a ``directory`` that is a link is refused, and no delete
        leaves it, whatever is swapped in meanwhile. With ``check``, only regular files for which
        ``check(file)`` is True go. Missing names and a missing directory are skipped. ``action``
        is what a failure's message says torchkeep was doing."""
        ...

    def sweep_temporaries(self, directory: str) -> list[str]:
        """Remove what writers that died left in ``directory`` (temporaries, staging folders)."""
        ...

    def remove_tree(self, path: str) -> None:
        """Remove a directory and everything in it, never following a link; a missing one is
        fine. For scratch directories (demos, tests), not for runs."""
        ...

    # -- locking ---------------------------------------------------------------------------------

    def lock(self, path: str) -> Lock:
        """The writer lock kept at ``path``, not yet acquired."""
        ...

    # ``list`` last: inside the class body its name would shadow the builtin in annotations.

    def list(self, path: str) -> list[str]:
        """Names of the entries in directory ``path``, sorted; a missing directory has none."""
        ...
