"""SQLite databases on disk (a model registry's index): opened here, since only storage touches files.

The connection is in autocommit mode (``isolation_level=None``): a caller groups its statements in
:func:`transaction`, which starts with ``BEGIN IMMEDIATE`` so that the write lock is taken at the
start (two writers never both read, then both write on a stale read). Journal mode is WAL
(readers never block the writer), ``synchronous=FULL`` (a commit is durable on return, as
``write_atomic`` is), and a busy timeout makes a writer wait for another one instead of failing.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from torchkeep.errors import CorruptCheckpointError
from torchkeep.storage._errors import storage_error
from torchkeep.storage._location import local_path

BUSY_TIMEOUT_S = 120.0


def connect_sqlite(path: str | os.PathLike[str], *, create: bool = False) -> sqlite3.Connection:
    """A connection to the database at ``path`` (created only with ``create``).

    Raises:
        StorageError: the file cannot be opened (or created), e.g. a read-only folder.
        FileNotFoundError: ``path`` is missing and ``create`` is False.
    """
    p: Path = local_path(path)
    if not create and not p.is_file():
        raise FileNotFoundError(2, "no such database", str(p))
    mode = "rwc" if create else "rw"
    try:
        conn = sqlite3.connect(
            f"file:{p.resolve()}?mode={mode}",
            uri=True,
            timeout=BUSY_TIMEOUT_S,
            isolation_level=None,
            check_same_thread=False,
        )
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
    except sqlite3.DatabaseError as exc:
        if "not a database" in str(exc) or not isinstance(exc, sqlite3.OperationalError):
            raise CorruptCheckpointError(
                f"not a SQLite database: {exc}",
                path=str(p),
                hint="the index was overwritten or damaged; restore it from a copy",
            ) from exc
        raise storage_error(OSError(5, str(exc), str(p)), p, "open the database") from exc
    return conn


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``; rolled back when the block raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (a signal 0 probe)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
