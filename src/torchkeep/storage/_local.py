"""`LocalStorage`: the :class:`~torchkeep.storage.Storage` protocol on the local filesystem.

Each method is a thin binding of the mechanisms next to it: commits in ``_atomic.py``, confined
deletes in ``_delete.py``, the run lock in ``_lock.py``, errors in ``_errors.py``. Their free
functions (``atomic_write``, ``fsync_dir``, ``staging_directory``, ``publish``, ``storage_error``,
``sweep_temporaries``) stay importable from here for code written before the protocol.

Reads stay as cheap as a bare ``open``: :meth:`LocalStorage.map` opens and maps the file once,
copy-on-write, with no read and no copy; ``torch.frombuffer`` cuts tensors straight from it.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from torchkeep.storage._atomic import (
    append,
    atomic_write,
    create_exclusive,
    fsync_dir,
    publish,
    staging_directory,
    sweep_temporaries,
)
from torchkeep.storage._delete import delete, delete_files, remove_tree, sweep_directory
from torchkeep.storage._errors import storage_error
from torchkeep.storage._lock import RunLock
from torchkeep.storage._protocol import Mapped

__all__ = [
    "LocalStorage",
    "atomic_write",
    "fsync_dir",
    "publish",
    "staging_directory",
    "storage_error",
    "sweep_temporaries",
]

_Path = str | os.PathLike[str]


class LocalStorage:
    """:class:`~torchkeep.storage.Storage` on the local filesystem.

    Args:
        root: relative paths are taken from here (default: the working directory); absolute
            paths are used as they are.
    """

    def __init__(self, root: _Path = "") -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def _abs(self, path: _Path) -> Path:
        return self.root / path

    # -- committing ------------------------------------------------------------------------------

    def write_atomic(
        self, path: _Path, write: Callable[[BinaryIO], None], *, sequential: bool = False
    ) -> None:
        atomic_write(self._abs(path), write)  # a local file is written in place either way

    def create_exclusive(self, path: _Path, write: Callable[[BinaryIO], None]) -> bool:
        return create_exclusive(self._abs(path), write)

    def append(self, path: _Path, data: bytes, *, durable: bool = False) -> None:
        append(self._abs(path), data, durable=durable)

    @contextlib.contextmanager
    def staging_directory(self, dest: _Path) -> Iterator[str]:
        with staging_directory(self._abs(dest)) as staging:
            yield str(staging)

    def publish(self, files: Sequence[_Path], directory: _Path) -> list[str]:
        moved = publish([self._abs(f) for f in files], self._abs(directory))
        return [str(p) for p in moved]

    def makedirs(self, path: _Path) -> None:
        try:
            self._abs(path).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise storage_error(exc, self._abs(path), "create the directory") from exc

    # -- reading ---------------------------------------------------------------------------------

    def open_read(self, path: _Path) -> BinaryIO:
        return open(self._abs(path), "rb")  # noqa: SIM115 - the caller closes it

    def read_bytes(self, path: _Path, start: int | None = None, length: int | None = None) -> bytes:
        p = self._abs(path)
        try:
            if start is None and length is None:
                return p.read_bytes()
            fd = os.open(p, os.O_RDONLY)
            try:
                offset = start or 0
                todo = os.fstat(fd).st_size - offset if length is None else length
                parts = []
                while todo > 0:
                    chunk = os.pread(fd, todo, offset)
                    if not chunk:
                        break
                    parts.append(chunk)
                    offset += len(chunk)
                    todo -= len(chunk)
                return b"".join(parts)
            finally:
                os.close(fd)
        except OSError as exc:
            raise storage_error(exc, p, "read the file") from exc

    def map(self, path: _Path) -> Mapped:
        fd = os.open(self._abs(path), os.O_RDONLY)
        try:
            st = os.fstat(fd)
            buffer = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY) if st.st_size else None
        finally:
            os.close(fd)  # the mapping keeps the file (the same inode) alive
        return Mapped(buffer=buffer, size=st.st_size, identity=(st.st_dev, st.st_ino))

    def size(self, path: _Path) -> int:
        return os.stat(self._abs(path)).st_size

    def exists(self, path: _Path) -> bool:
        return self._abs(path).exists()

    # -- removing --------------------------------------------------------------------------------

    def delete(self, path: _Path) -> None:
        delete(self._abs(path))

    def delete_files(
        self,
        directory: _Path,
        names: Iterable[str],
        *,
        check: Callable[[BinaryIO], bool] | None = None,
        action: str = "delete the files",
        grace: bool = False,
    ) -> list[str]:
        return delete_files(self._abs(directory), names, check=check, action=action)

    def sweep_temporaries(self, directory: _Path) -> list[str]:
        return [str(p) for p in sweep_directory(self._abs(directory))]

    def remove_tree(self, path: _Path) -> None:
        remove_tree(self._abs(path))

    # -- locking ---------------------------------------------------------------------------------

    def lock(self, path: _Path) -> RunLock:
        return RunLock(self._abs(path))

    def list(self, path: _Path = "") -> list[str]:
        p = self._abs(path)
        try:
            return sorted(os.listdir(p))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise storage_error(exc, p, "list the directory") from exc
