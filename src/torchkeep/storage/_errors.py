"""Every storage failure, one table: an ``errno`` becomes a :class:`StorageError` with a hint.

A raw ``OSError`` says what the kernel saw (``[Errno 28] No space left on device``); the user needs
what torchkeep was doing (``could not write the file``), where, and the way out (free space or
write elsewhere). :func:`storage_error` is the one place that builds a ``StorageError``, so that
the same errno gives the same advice whichever module hit it. A remote store translates its own
failures into ``OSError`` with the nearest errno (``EACCES`` for a 403...) and comes here too.
"""

from __future__ import annotations

import errno
import os

from torchkeep.errors import StorageError

__all__ = ["HINTS", "storage_error"]

HINTS: dict[int, str] = {
    errno.ENOSPC: "the disk is full: free space or write somewhere else",
    errno.EDQUOT: "the disk quota is exhausted: free space or write somewhere else",
    errno.EACCES: "permission denied: check the directory's owner and mode",
    errno.EPERM: "operation not permitted: check the directory's owner and mode",
    errno.EROFS: "the filesystem is read-only: write somewhere else",
    errno.EIO: "the device reported an I/O error: check the disk",
    errno.EFBIG: "the file is larger than this process or filesystem allows",
    errno.EISDIR: "give a file name such as model.safetensors",
    errno.ELOOP: "a symbolic link is in the way: torchkeep does not follow links there",
}
_DEFAULT_HINT = "check that the path is writable and the disk healthy"


def storage_error(
    exc: OSError | None,
    path: str | os.PathLike[str],
    action: str,
    *,
    message: str | None = None,
    hint: str | None = None,
) -> StorageError:
    """The :class:`StorageError` for ``exc``, raised while trying to ``action``.

    Args:
        exc: the failure; ``None`` for a refusal that no system call made (a URL with no store).
        path: where it happened.
        action: what torchkeep was doing, as a verb phrase ("write the file").
        message: replaces ``could not {action}: {reason}`` when the caller knows better.
        hint: replaces the table's hint for this errno.

    Returns:
        The error, with ``errno`` and ``__cause__`` taken from ``exc``; the caller raises it.
    """
    code = exc.errno if exc is not None else None
    if message is None:
        reason = (exc.strerror or str(exc)) if exc is not None else "refused"
        message = f"could not {action}: {reason}"
    err = StorageError(
        message, path=os.fspath(path), hint=hint or HINTS.get(code or 0, _DEFAULT_HINT)
    )
    err.errno = code
    err.__cause__ = exc
    return err
