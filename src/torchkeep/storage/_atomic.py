"""Commits on a local filesystem: atomic replace, exclusive create, staged publish, append.

Atomicity by rename, not by a commit marker. A file is written to a temporary name in the same
directory, flushed and fsynced, then renamed over the destination with ``os.replace``, and finally
the directory itself is fsynced so that the rename survives a power cut. ``rename(2)`` within one
filesystem is atomic on POSIX: a reader, or a process that restarts after a crash or a ``kill -9``,
sees either the previous complete file or the new complete file, never a mix. That rename is the
single commit point. (Object stores have no rename; there a single PUT is the atomic unit, and the
remote :class:`~torchkeep.storage.Storage` uploads the whole object at once instead.)

Temporary files are named ``.<name>.tkp-<pid>-<random>`` so that leftovers of a crashed writer can
be recognised and swept: the next write to the same destination removes those whose process is no
longer alive. They are never taken for a checkpoint because their names are hidden and never match
what readers look for.

:func:`create_exclusive` is the conditional create (a manifest that must not overwrite another
writer's): the content goes to a temporary file as above, then ``link(2)`` gives it its final name.
``link`` fails with ``EEXIST`` when the name is taken, atomically, like ``O_EXCL``, but unlike an
``O_EXCL`` open of the final name it never shows a half-written file. The remote equivalent is a
conditional PUT (``If-None-Match: *``).
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
from torchkeep.storage._errors import storage_error
from torchkeep.storage._location import local_path

__all__ = [
    "append",
    "atomic_write",
    "create_exclusive",
    "fsync_dir",
    "fsync_folder",
    "publish",
    "staging_directory",
    "sweep_temporaries",
]

_TMP_MARK = ".tkp-"
_UNSYNCABLE = (errno.EINVAL, errno.ENOTSUP, errno.EBADF)  # a directory this filesystem can't sync


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


def fsync_folder(fd: int) -> None:
    """Fsync an open directory; a filesystem that cannot sync directories is tolerated."""
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _UNSYNCABLE:
            raise


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Fsync a directory so that a rename or a new entry in it is durable."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # not every platform can open a directory; the rename itself is still atomic
    try:
        fsync_folder(fd)
    finally:
        os.close(fd)


def _prepare(path: str | os.PathLike[str]) -> Path:
    """The destination, its parent created and the dead writers' temporaries beside it swept."""
    dest = local_path(path)
    if dest.is_dir():
        raise storage_error(
            IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR)),
            dest,
            "write the file",
            message="cannot write a file there: it is a directory",
        )
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise storage_error(exc, dest.parent, "create the directory") from exc
    sweep_temporaries(dest)
    return dest


def _write_temporary(dest: Path, write: Callable[[BinaryIO], None]) -> Path:
    """A fsynced temporary file beside ``dest`` filled by ``write``; removed if anything fails."""
    tmp = _tmp_name(dest)
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "w+b") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return tmp


def _durable(parent: Path) -> None:
    try:
        fsync_dir(parent)
    except OSError as exc:
        # The rename happened: readers see the new file, which may not survive a power cut.
        err = storage_error(exc, parent, "make the new file durable")
        err.committed = True
        raise err from exc


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` atomically: ``write`` fills a temporary file that replaces ``path`` at the end.

    If ``write`` raises, or the process dies, the previous content of ``path`` is untouched and the
    temporary file is removed (now, or by the next write to the same path).

    Raises:
        StorageError: the filesystem failed (disk full, permission denied, I/O error). With
            ``err.committed``, only the fsync of the directory after the rename failed: the new
            file is in place but may not survive a power cut.
    """
    dest = _prepare(path)
    tmp: Path | None = None
    try:
        tmp = _write_temporary(dest, write)
        os.replace(tmp, dest)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        if isinstance(exc, OSError) and not isinstance(exc, StorageError):
            raise storage_error(exc, dest, "write the file") from exc
        raise
    _durable(dest.parent)


def create_exclusive(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> bool:
    """Create ``path`` with the content ``write`` gives, only if nothing is there yet.

    Returns:
        True when this call created the file; False when ``path`` already existed (it is left
        as it was, and nothing else changes).

    Raises:
        StorageError: as :func:`atomic_write`; ``committed`` likewise.
    """
    dest = _prepare(path)
    tmp: Path | None = None
    try:
        tmp = _write_temporary(dest, write)
        try:
            os.link(tmp, dest)
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
    except OSError as exc:
        if isinstance(exc, StorageError):
            raise
        raise storage_error(exc, dest, "create the file") from exc
    _durable(dest.parent)
    return True


def append(path: str | os.PathLike[str], data: bytes, *, durable: bool = False) -> None:
    """Append ``data`` to ``path`` (created if missing), all of it or none of it.

    A failed write truncates the file back, so that no half line is left for a retry to follow.
    ``durable`` fsyncs the file after; without it the data may be lost in a power cut (never in
    a crash of the process).

    Raises:
        OSError: unchanged, so that the caller can keep the data and retry later.
    """
    view = memoryview(data)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


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
