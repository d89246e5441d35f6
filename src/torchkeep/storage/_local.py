"""Atomic writes on a local filesystem.

A file is written to a temporary name in the same directory, flushed and fsynced, then renamed over
the destination with ``os.replace``, and finally the directory itself is fsynced so that the rename
survives a power cut. ``rename(2)`` within one filesystem is atomic on POSIX: a reader, or a process
that restarts after a crash or a ``kill -9``, sees either the previous complete file or the new
complete file, never a mix. That rename is the single commit point.

Temporary files are named ``.<name>.tkp-<pid>-<random>`` so that leftovers of a crashed writer can
be recognised and swept: the next write to the same destination removes those whose process is no
longer alive. They are never taken for a checkpoint because their names are hidden and never match
what readers look for.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from torchkeep.errors import StorageError
from torchkeep.storage._location import local_path

_TMP_MARK = ".tkp-"


def _tmp_name(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}{_TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_temporaries(dest: Path) -> list[Path]:
    """Remove temporary files (and staging directories) left next to ``dest`` by writers that
    died; return what was removed."""
    removed: list[Path] = []
    prefix = f".{dest.name}{_TMP_MARK}"
    try:
        entries = list(dest.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        pid_text = entry.name[len(prefix) :].split("-", 1)[0]
        if pid_text.isdigit() and _pid_alive(int(pid_text)):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir() and not entry.is_symlink():  # a staging directory
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
    return removed


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Fsync a directory so that a rename or a new entry in it is durable."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # not every platform can open a directory; the rename itself is still atomic
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def storage_error(exc: OSError, path: str | os.PathLike[str], action: str) -> StorageError:
    """Turn an ``OSError`` into a :class:`StorageError` that says what to do about it."""
    hints = {
        errno.ENOSPC: "the disk is full: free space or write somewhere else",
        errno.EDQUOT: "the disk quota is exhausted: free space or write somewhere else",
        errno.EACCES: "permission denied: check the directory's owner and mode",
        errno.EPERM: "operation not permitted: check the directory's owner and mode",
        errno.EROFS: "the filesystem is read-only: write somewhere else",
        errno.EIO: "the device reported an I/O error: check the disk",
        errno.EFBIG: "the file is larger than this process or filesystem allows",
    }
    reason = exc.strerror or str(exc)
    err = StorageError(
        f"could not {action}: {reason}",
        path=str(path),
        hint=hints.get(exc.errno or 0, "check that the path is writable and the disk healthy"),
    )
    err.errno = exc.errno
    err.__cause__ = exc
    return err


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` atomically: ``write`` fills a temporary file that replaces ``path`` at the end.

    If ``write`` raises, or the process dies, the previous content of ``path`` is untouched and the
    temporary file is removed (now, or by the next write to the same path).

    Raises:
        StorageError: the filesystem failed (disk full, permission denied, I/O error). With
            ``err.committed``, only the fsync of the directory after the rename failed: the new
            file is in place but may not survive a power cut.
    """
    dest = local_path(path)
    if dest.is_dir():
        raise StorageError(
            "cannot write a file there: it is a directory",
            path=str(dest),
            hint="give a file name such as model.safetensors",
        )
    parent = dest.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise storage_error(exc, parent, "create the directory") from exc
    sweep_temporaries(dest)
    tmp = _tmp_name(dest)
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "w+b") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and not isinstance(exc, StorageError):
            raise storage_error(exc, dest, "write the file") from exc
        raise
    try:
        fsync_dir(parent)
    except OSError as exc:
        # The rename happened: readers see the new file, which may not survive a power cut.
        err = storage_error(exc, parent, "make the new file durable")
        err.committed = True
        raise err from exc


@contextlib.contextmanager
def staging_directory(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """A fresh hidden directory beside ``dest`` for files that :func:`publish` moves into place;
    removed, with whatever is left in it, at exit."""
    target = Path(dest)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        sweep_temporaries(target)
        staging = _tmp_name(target)
        staging.mkdir()
    except OSError as exc:
        raise storage_error(exc, target.parent, "create a staging directory") from exc
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish(files: Sequence[Path], directory: Path) -> list[Path]:
    """Move ``files`` into ``directory`` under their names, durably: each is fsynced, then
    renamed in order, then the directory is fsynced. The last file is the commit point, so list
    the file that refers to the others (``model.onnx`` after ``model.onnx.data``) last.
    """
    moved = []
    try:
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for f in files:
            os.replace(f, directory / f.name)
            moved.append(directory / f.name)
        fsync_dir(directory)
    except OSError as exc:
        raise storage_error(exc, directory, "move the new files into place") from exc
    return moved


class LocalStorage:
    """:class:`~torchkeep.storage.Storage` on the local filesystem, rooted at ``root``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def _abs(self, path: str) -> Path:
        return self.root / path

    def write_atomic(self, path: str, write: Callable[[BinaryIO], None]) -> None:
        atomic_write(self._abs(path), write)

    def read_bytes(self, path: str) -> bytes:
        try:
            return self._abs(path).read_bytes()
        except OSError as exc:
            raise storage_error(exc, self._abs(path), "read the file") from exc

    def exists(self, path: str) -> bool:
        return self._abs(path).exists()

    def list(self, path: str = "") -> list[str]:
        try:
            return sorted(p.name for p in self._abs(path).iterdir())
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise storage_error(exc, self._abs(path), "list the directory") from exc

    def delete(self, path: str) -> None:
        try:
            self._abs(path).unlink(missing_ok=True)
        except OSError as exc:
            raise storage_error(exc, self._abs(path), "delete the file") from exc
