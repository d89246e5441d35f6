"""One writer per run: an advisory ``flock`` on ``RUN/.lock``.

:meth:`LocalStorage.lock <torchkeep.storage.LocalStorage.lock>` hands out a :class:`RunLock`.

``flock`` locks belong to the open file, so the kernel drops them when the process dies, however
it dies (``kill -9`` included): a lock left by a crashed writer is never stale. The file itself
only records who holds the lock (pid, host, start time) so that the error can name them.

``flock`` is local to one machine (and unreliable on some network filesystems): a remote store
needs a lease of its own (a conditional create of the lock object with an expiry), which is why
the lock is a :class:`~torchkeep.storage.Storage` method rather than a free function.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import IO

from torchkeep.errors import CorruptCheckpointError, RunLockedError, StorageError
from torchkeep.storage._errors import storage_error

__all__ = ["RunLock"]

_READ_WITHOUT_LOCK = (
    "open it with CheckpointManager(path, read_only=True) to list and load checkpoints, or "
    "read it with torchkeep.load('RUN@latest') or `torchkeep ls RUN`, which take no lock"
)


def _lock_error(exc: OSError, path: Path) -> StorageError:
    """Why a writer cannot lock the run, and how to read it anyway."""
    action = "lock the run for writing"
    if exc.errno == errno.EROFS:
        return storage_error(
            exc,
            path.parent,
            action,
            message="the run is on a read-only filesystem, so it cannot be opened for writing",
            hint=_READ_WITHOUT_LOCK,
        )
    if exc.errno in (errno.EACCES, errno.EPERM):
        return storage_error(
            exc,
            path.parent,
            action,
            message=f"cannot create or lock {path.name} in the run: permission denied",
            hint="write as the run's owner, or " + _READ_WITHOUT_LOCK,
        )
    return storage_error(exc, path, action)


class RunLock:
    """The writer lock of a run; released by :meth:`release` or when the process exits.

    Raises (from :meth:`acquire`):
        RunLockedError: another process holds it (the message names the holder).
        CorruptCheckpointError: the lock file is a symbolic link.
        StorageError: the file cannot be created or locked (read-only, permission, I/O).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        # O_NOFOLLOW: a link at .lock must not make the truncate below clobber another file.
        flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
        fd = -1
        try:
            fd = os.open(self.path, flags, 0o666)
            f = open(fd, "a+")  # noqa: SIM115 - kept open while the lock is held
        except OSError as exc:
            if fd >= 0:
                os.close(fd)
            if exc.errno == errno.ELOOP:
                raise CorruptCheckpointError(
                    "the run's lock file is a symbolic link",
                    path=str(self.path),
                    hint="remove the link; a run's files must be inside it",
                ) from exc
            raise _lock_error(exc, self.path) from exc
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunLockedError(
                f"the run is locked by a writer: {holder}", path=str(self.path.parent)
            ) from None
        except OSError as exc:
            f.close()
            raise _lock_error(exc, self.path) from exc
        # Who holds the lock is only shown in RunLockedError: a full disk must not stop a
        # writer that holds the lock (its saves then report the full disk themselves).
        with contextlib.suppress(OSError):
            f.seek(0)
            f.truncate()
            owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
            f.write(json.dumps(owner))
            f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is None:
            return
        with contextlib.suppress(OSError):
            self._file.seek(0)
            self._file.truncate()
        fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
        self._file.close()
        self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None
