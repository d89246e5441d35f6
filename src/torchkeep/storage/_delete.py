"""Deletes that never follow a link, and never leave the folder they were aimed at.

A run's ``packs/`` folder is garbage-collected by name: a link swapped in for the folder, or for a
file in it, must not turn "delete the unused packs" into "delete files in the user's home". So the
folder is opened once with ``O_NOFOLLOW`` (a link there is refused) and every delete is relative
to that descriptor (``unlink(name, dir_fd=...)``) with a plain name: swapping the folder for a link
after the open cannot redirect a delete, and ``unlink`` itself removes a link, never its target.
One fsync of the folder at the end makes the batch durable.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

from torchkeep.storage._atomic import fsync_folder, sweep_temporaries
from torchkeep.storage._errors import storage_error

__all__ = ["delete", "delete_files", "remove_tree", "sweep_directory"]

_FOLDER = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def _plain(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name


def _passes(folder: int, name: str, check: Callable[[BinaryIO], bool]) -> bool:
    st = os.stat(name, dir_fd=folder, follow_symlinks=False)
    if not stat.S_ISREG(st.st_mode):
        return False  # a link, a folder, a device: never what a check is about
    fd = os.open(name, os.O_RDONLY | _NOFOLLOW, dir_fd=folder)
    with os.fdopen(fd, "rb") as f:
        return check(f)


def delete_files(
    directory: str | os.PathLike[str],
    names: Iterable[str],
    *,
    check: Callable[[BinaryIO], bool] | None = None,
    action: str = "delete the files",
) -> list[str]:
    """Remove ``names`` from the real folder ``directory``; return the names removed.

    Args:
        directory: the folder; a link there is refused (``StorageError``, ``ELOOP``).
        names: plain names (no ``/``); missing ones are skipped.
        check: when given, a name is removed only if it is a regular file and ``check`` of the
            file opened for reading (without following a link) returns True.
        action: what the error message says failed ("delete unused packs").

    Raises:
        ValueError: a name is not plain.
        StorageError: the folder cannot be opened, or a delete or the folder's fsync failed
            (the names before it are gone).
    """
    try:
        folder = os.open(directory, _FOLDER | _NOFOLLOW)
    except FileNotFoundError:
        return []
    except OSError as exc:
        cause = exc
        if os.path.islink(directory):  # Linux says ENOTDIR for O_DIRECTORY | O_NOFOLLOW
            cause = OSError(errno.ELOOP, "the folder is a symbolic link", os.fspath(directory))
        raise storage_error(cause, directory, action) from exc
    removed: list[str] = []
    try:
        for name in names:
            if not _plain(name):
                raise ValueError(f"{name!r} is not a plain file name")
            try:
                if check is not None and not _passes(folder, name, check):
                    continue
                os.unlink(name, dir_fd=folder)
            except FileNotFoundError:
                continue
            removed.append(name)
        fsync_folder(folder)
    except OSError as exc:
        raise storage_error(exc, directory, action) from exc
    finally:
        os.close(folder)
    return removed


def delete(path: str | os.PathLike[str]) -> None:
    """Remove the file ``path`` (a link is removed, not its target); missing is fine.

    Raises:
        StorageError: the delete or the fsync of its folder failed.
    """
    p = Path(path)
    try:
        folder = os.open(p.parent, _FOLDER)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise storage_error(exc, p, "delete the file") from exc
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p.name, dir_fd=folder)
        fsync_folder(folder)
    except OSError as exc:
        raise storage_error(exc, p, "delete the file") from exc
    finally:
        os.close(folder)


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Remove a directory tree; links inside are removed, never followed; a link at ``path``
    itself is refused. Missing is fine.

    Raises:
        StorageError: something in it could not be removed.
    """
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise storage_error(exc, path, "remove the directory") from exc


def sweep_directory(directory: str | os.PathLike[str]) -> list[Path]:
    """Remove every temporary file or staging folder in ``directory`` whose writer died."""
    folder = Path(directory)
    try:
        entries = os.listdir(folder)
    except OSError:
        return []
    removed: list[Path] = []
    for dest in sorted({e.split(".tkp-")[0][1:] for e in entries if _is_temporary(e)}):
        removed += sweep_temporaries(folder / dest)
    return removed


def _is_temporary(entry: str) -> bool:
    return entry.startswith(".") and ".tkp-" in entry
