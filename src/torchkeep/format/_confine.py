"""Paths confined to a run directory: nothing below the run's root may be a symbolic link.

A run is a directory the user chose; the root itself may be reached through links (``runs/`` on
another disk). Below it, every component of every path a reader or a writer uses, the folders
``checkpoints/`` and ``packs/`` included, must be the real thing: a link could send a read to
tensors outside the run, or a delete of "unreferenced packs" into a user's own folder. Checking
the last component alone is not enough, so :func:`lstat_inside` walks the path with ``lstat``, one
component at a time, and names are plain (no ``/``, no ``..``) so that the walk cannot climb.

Deletes do not rely on that check alone: :func:`open_folder` opens a folder with ``O_NOFOLLOW``
and the writer deletes relative to that descriptor (``unlink(name, dir_fd=...)``), so a folder
swapped for a link after the check still cannot redirect a delete. Reads check, then open: the
remaining window is a swap made between the two calls, by someone who can already write the run.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Literal

from torchkeep.errors import CorruptCheckpointError

Kind = Literal["file", "dir"]

_HINT = (
    "a link could point anywhere on the machine: replace it by the real {what} "
    "(move the files into the run), or open the run where it really is"
)


def _plain(part: str) -> bool:
    return bool(part) and part not in (".", "..") and "/" not in part and "\0" not in part


def lstat_inside(root: Path, *parts: str, kind: Kind) -> os.stat_result | None:
    """The ``lstat`` of ``root/parts...``, or ``None`` when it does not exist.

    Every component below ``root`` must be a real directory, and the last one a real ``kind``.

    Raises:
        CorruptCheckpointError: a component is a symbolic link, or is not a directory or
            regular file as expected.
    """
    path = root
    for i, part in enumerate(parts):
        if not _plain(part):
            raise CorruptCheckpointError(
                f"{part!r} is not a plain name inside the run", path=str(root), key=part
            )
        path = path / part
        last = i == len(parts) - 1
        try:
            st = path.lstat()  # a RemotePath asks its store (no links there)
        except (FileNotFoundError, NotADirectoryError):
            return None
        what = kind if last else "dir"
        if stat.S_ISLNK(st.st_mode):
            noun = "folder" if what == "dir" else "file"
            raise CorruptCheckpointError(
                f"{path} is a symbolic link; a run's {noun}s must be inside it",
                path=str(root),
                key="/".join(parts[: i + 1]),
                hint=_HINT.format(what=noun),
            )
        expected = stat.S_ISDIR if what == "dir" else stat.S_ISREG
        if not expected(st.st_mode):
            raise CorruptCheckpointError(
                f"{path} is not a {'directory' if what == 'dir' else 'regular file'}",
                path=str(root),
                key="/".join(parts[: i + 1]),
                hint="the run was altered by hand; restore it from a copy",
            )
        if last:
            return st
    return root.stat()


def open_folder(root: Path, name: str) -> int:
    """A descriptor of the real folder ``root/name``, opened without following a link.

    Raises:
        CorruptCheckpointError: ``root/name`` is a link or not a directory.
        FileNotFoundError: it does not exist.
    """
    lstat_inside(root, name, kind="dir")
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        return os.open(root / name, flags)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise CorruptCheckpointError(
            f"{root / name} is not a real folder of the run ({exc.strerror})",
            path=str(root),
            key=name,
            hint=_HINT.format(what="folder"),
        ) from exc
