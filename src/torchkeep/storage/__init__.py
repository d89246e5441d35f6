"""Where bytes live: the only layer that writes, reads, maps, lists, deletes and locks files.

The storage layer knows nothing about tensors. :func:`storage_for` chooses the
:class:`Storage` for a location: :class:`LocalStorage` for paths; a URL (``s3://``...) is refused
with a ``StorageError`` until a remote store (fsspec) is plugged in there, behind the same
protocol. Every ``StorageError`` is built by :func:`storage_error`, from one errno-to-hint table.

Modules: ``_protocol.py`` (the contract and each method's guarantee), ``_local.py``
(``LocalStorage``), ``_atomic.py`` (atomic replace, exclusive create, staged publish, append),
``_delete.py`` (confined deletes), ``_lock.py`` (the run lock), ``_errors.py``, ``_location.py``
(paths versus URLs).
"""

from __future__ import annotations

import os

from torchkeep.storage._atomic import (
    atomic_write,
    fsync_dir,
    publish,
    staging_directory,
    sweep_temporaries,
)
from torchkeep.storage._errors import storage_error
from torchkeep.storage._local import LocalStorage
from torchkeep.storage._location import is_url, local_path
from torchkeep.storage._lock import RunLock
from torchkeep.storage._protocol import Lock, Mapped, Storage
from torchkeep.storage._sqlite import connect_sqlite, pid_alive, transaction

__all__ = [
    "connect_sqlite",
    "pid_alive",
    "transaction",
    "LocalStorage",
    "Lock",
    "Mapped",
    "RunLock",
    "Storage",
    "atomic_write",
    "fsync_dir",
    "is_url",
    "local_path",
    "publish",
    "staging_directory",
    "storage_error",
    "storage_for",
    "sweep_temporaries",
]

_LOCAL = LocalStorage()


def storage_for(location: str | os.PathLike[str]) -> Storage:
    """The :class:`Storage` that holds ``location``.

    Args:
        location: a local path (``str`` or path-like); later a URL.

    Returns:
        The store; hand it ``location`` itself (paths stay as the caller wrote them).

    Raises:
        StorageError: ``location`` is a URL, and no remote store exists yet.
    """
    local_path(location)  # a URL is refused here; the remote store will be chosen here instead
    return _LOCAL
