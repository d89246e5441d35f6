"""One writer per remote run: a lease object at ``RUN/.lock``, with an expiry and a renewal.

An object store has no ``flock``, and a lock that a dead writer cannot drop must end by itself.
The lease is a small JSON object::

    {"kind": "torchkeep-lease", "token": "9f2c...", "pid": 4242, "host": "node-3",
     "since": 1767312000.0, "renewed": 1767312040.0, "expires": 1767312100.0, "ttl": 60.0}

- :meth:`Lease.acquire` creates it with a conditional create: of two writers exactly one wins.
  The loser reads it and is refused with ``RunLockedError`` naming the holder and when the lease
  expires. A lease past its expiry is stale (its writer died, or lost the store for a whole
  ``ttl``): it is deleted and the create tried once more, still conditional.
- While held, a daemon thread renews it every ``ttl / 3`` (rewrites ``renewed`` and
  ``expires``), after reading it back: a lease whose token is no longer ours was taken over, and
  renewal stops (``lost`` is set).
- :meth:`Lease.release` deletes it, only if the token is still ours.

The ttl is ``TORCHKEEP_LEASE_SECONDS`` (default 60 s).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import secrets
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, BinaryIO

from torchkeep.errors import RunLockedError

if TYPE_CHECKING:
    from torchkeep.storage._remote import RemoteStorage

__all__ = ["LEASE_KIND", "Lease", "lease_seconds"]

LEASE_KIND = "torchkeep-lease"


def lease_seconds() -> float:
    try:
        return max(float(os.environ.get("TORCHKEEP_LEASE_SECONDS", "60")), 0.5)
    except ValueError:
        return 60.0


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class Lease:
    """The writer lease of a remote run (the :class:`~torchkeep.storage.Lock` protocol)."""

    def __init__(self, store: RemoteStorage, path: str, ttl: float | None = None) -> None:
        self.store = store
        self.path = path
        self.ttl = lease_seconds() if ttl is None else ttl
        self.token = secrets.token_hex(16)
        self.since = 0.0
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _document(self) -> bytes:
        now = time.time()
        return json.dumps(
            {
                "kind": LEASE_KIND,
                "token": self.token,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": self.since,
                "renewed": now,
                "expires": now + self.ttl,
                "ttl": self.ttl,
            }
        ).encode()

    def _read(self) -> dict[str, Any] | None:
        try:
            doc = json.loads(self.store.read_bytes(self.path))
        except FileNotFoundError:
            return None
        except OSError as exc:
            if isinstance(exc.__cause__, FileNotFoundError):
                return None
            raise
        except ValueError:
            return {}  # damaged: treated as expired
        return doc if isinstance(doc, dict) else {}

    def _write_document(self, f: BinaryIO) -> None:
        f.write(self._document())

    def _create(self) -> bool:
        return self.store.create_exclusive(self.path, self._write_document)

    def acquire(self) -> None:
        self.since = time.time()
        if not self._create():
            holder = self._read()
            expires = float(holder.get("expires", 0)) if holder is not None else 0.0
            if holder is not None and expires > time.time():
                who = f"pid {holder.get('pid')} on {holder.get('host')}"
                raise RunLockedError(
                    f"the run is locked by a writer: {who}, whose lease expires at "
                    f"{_when(expires)} (in {max(expires - time.time(), 0):.0f} s) unless renewed",
                    path=self.path.rsplit("/", 1)[0],
                    hint="stop that writer, or wait for its lease to expire; readers need no "
                    "lock: CheckpointManager(path, read_only=True), torchkeep.load('RUN@latest')",
                )
            self.store.delete(self.path)  # stale: its writer stopped renewing it
            if not self._create():
                raise RunLockedError(
                    "another writer took the run's expired lease at the same time",
                    path=self.path.rsplit("/", 1)[0],
                    hint="only one writer per run: stop the other one",
                )
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew, name="torchkeep-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                doc = self._read()
                if doc is None or doc.get("token") != self.token:
                    self.lost = True
                    return
                self.store.write_atomic(self.path, self._write_document)
            except Exception:  # noqa: S112 - a missed renewal is retried; expiry is the limit
                continue

    def release(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=10)
        self._thread = None
        with contextlib.suppress(Exception):
            doc = self._read()
            if doc is not None and doc.get("token") == self.token:
                self.store.delete(self.path)

    @property
    def held(self) -> bool:
        return self._thread is not None and not self.lost
