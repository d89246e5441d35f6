"""The registry's packs: written before the index row that names them, collected after.

The order keeps the index and the packs consistent through a crash (``kill -9`` included):

1. In one transaction, the packs a new version will use (the one it writes, and the packs of
   older versions holding tensors it reuses) are recorded in ``pending`` with the writer's host
   and pid: a collection never deletes a pending pack whose writer is alive.
2. The new pack is written (temporary file, fsync, rename, fsync of ``packs/``).
3. One transaction inserts the version and its tensor table and drops the pending rows: the
   commit point. A crash before it leaves a pack no row names and a pending row of a dead pid.

Deleting a version removes its rows first (one transaction), then :func:`collect` deletes, with
the index's write lock held (so that no writer records a pending pack meanwhile), every pack that
no version names and no live writer is about to use, and only files with a pack's name and
header (``is_pack``). A crash in between leaves unreferenced packs, which the next collection
deletes. Versions never lose a pack: a tensor table only names packs durable before it committed.
"""

from __future__ import annotations

import getpass
import os
import socket
import sqlite3
import time
from pathlib import Path
from typing import BinaryIO

import torch

from torchkeep.format import HashingWriter, is_pack, is_pack_name, pack_name, write_pack
from torchkeep.storage import pid_alive, storage_for, transaction

PACK_DIR = "packs"
STALE_REMOTE_S = 24 * 3600.0  # a pending row of another host is trusted this long


def write_new_pack(root: Path, tensors: dict[str, torch.Tensor], name: str) -> None:
    """Write ``tensors`` into ``packs/<name>``, durably (step 2 above)."""
    path = root / PACK_DIR / name

    def write(f: BinaryIO) -> None:
        write_pack(HashingWriter(f), tensors)  # type: ignore[arg-type]  # only write() is used

    storage_for(path).write_atomic(str(path), write)


def new_pack_name() -> str:
    return pack_name(int(time.time()))


def mark_pending(conn: sqlite3.Connection, token: str, packs: set[str]) -> None:
    """Record that this process is about to use ``packs`` (inside the caller's transaction)."""
    host, now = socket.gethostname(), time.time()
    conn.executemany(
        "INSERT OR IGNORE INTO pending (token, pack, host, pid, time) VALUES (?, ?, ?, ?, ?)",
        [(token, p, host, os.getpid(), now) for p in sorted(packs)],
    )


def drop_pending(conn: sqlite3.Connection, token: str) -> None:
    conn.execute("DELETE FROM pending WHERE token = ?", (token,))


def _live_pending(conn: sqlite3.Connection) -> set[str]:
    """Packs of live writers' pending rows; rows of dead writers are deleted."""
    host, now, live, dead = socket.gethostname(), time.time(), set(), []
    for token, pack, h, pid, t in conn.execute("SELECT token, pack, host, pid, time FROM pending"):
        alive = pid_alive(pid) if h == host else now - t < STALE_REMOTE_S
        if alive:
            live.add(pack)
        else:
            dead.append((token, pack))
    conn.executemany("DELETE FROM pending WHERE token = ? AND pack = ?", dead)
    return live


def collect(conn: sqlite3.Connection, root: Path) -> list[str]:
    """Delete the packs that no version names and no live writer is about to use.

    Returns:
        The names of the packs deleted.
    """
    folder = str(root / PACK_DIR)
    store = storage_for(folder)
    with transaction(conn):
        used = {r[0] for r in conn.execute("SELECT DISTINCT pack FROM tensors")}
        used |= _live_pending(conn)
        store.sweep_temporaries(folder)
        unused = [n for n in store.list(folder) if n not in used and is_pack_name(n)]
        if not unused:
            return []
        return store.delete_files(folder, unused, check=is_pack, action="delete unused packs")


def delete_pack(root: Path, name: str) -> None:
    """Remove a pack this process wrote and no row names (a register that failed)."""
    folder = str(root / PACK_DIR)
    storage_for(folder).delete_files(folder, [name], check=is_pack, action="delete the new pack")


def user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return os.environ.get("USER", "unknown")
