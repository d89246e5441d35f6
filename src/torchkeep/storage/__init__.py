"""Where bytes live: the only layer that writes, reads, maps, lists, deletes and locks files.

The storage layer knows nothing about tensors. :func:`storage_for` chooses the
:class:`Storage` for a location: :class:`LocalStorage` for paths, :class:`RemoteStorage` (fsspec)
for URLs (``s3://``, ``gs://``, ``az://``, ``memory://``...), both behind the same protocol. Every
``StorageError`` is built by :func:`storage_error`, from one errno-to-hint table.

Modules: ``_protocol.py`` (the contract and each method's guarantee), ``_local.py``
(``LocalStorage``), ``_atomic.py`` (atomic replace, exclusive create, staged publish, append),
``_delete.py`` (confined deletes), ``_lock.py`` (the local run lock), ``_errors.py``,
``_location.py`` (paths versus URLs), ``_url.py`` (``RemotePath``), ``_remote.py``
(``RemoteStorage``), ``_fsspec.py`` (the filesystem of a scheme), ``_upload.py`` (streamed
multipart uploads, transfer reports), ``_ranges.py`` (lazily fetched byte ranges), ``_lease.py``
(the remote run's lease).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torchkeep.storage._atomic import (
    atomic_write,
    fsync_dir,
    publish,
    staging_directory,
    sweep_temporaries,
)
from torchkeep.storage._errors import storage_error
from torchkeep.storage._lease import Lease
from torchkeep.storage._local import LocalStorage
from torchkeep.storage._location import is_url, local_path
from torchkeep.storage._lock import RunLock
from torchkeep.storage._protocol import Lock, Mapped, Storage
from torchkeep.storage._remote import RemoteStorage, remote_storage, remote_tree_bytes
from torchkeep.storage._sqlite import connect_sqlite, pid_alive, transaction
from torchkeep.storage._upload import observe_transfers
from torchkeep.storage._url import RemotePath

__all__ = [
    "Lease",
    "LocalStorage",
    "Lock",
    "Mapped",
    "RemotePath",
    "RemoteStorage",
    "RunLock",
    "Storage",
    "atomic_write",
    "connect_sqlite",
    "fsync_dir",
    "is_url",
    "local_path",
    "observe_transfers",
    "pid_alive",
    "publish",
    "remote_storage",
    "remote_tree_bytes",
    "staging_directory",
    "storage_error",
    "storage_for",
    "sweep_temporaries",
    "transaction",
]

_LOCAL = LocalStorage()


def storage_for(
    location: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> Storage:
    """The :class:`Storage` that holds ``location``.

    Args:
        location: a local path (``str`` or path-like), a URL (``s3://bucket/run``), or a
            :class:`RemotePath` (which carries its own options).
        storage_options: for a URL, the options of its fsspec filesystem (``key``, ``secret``,
            ``endpoint_url``, ``client_kwargs``...). Without them, the store reads what fsspec
            and boto read (``AWS_ENDPOINT_URL``, ``AWS_*`` credentials, fsspec's config).

    Returns:
        The store; hand it ``location`` itself (paths stay as the caller wrote them).

    Raises:
        StorageError: a URL whose scheme no installed fsspec backend serves.
    """
    path = local_path(location, storage_options)
    if isinstance(path, RemotePath):
        return remote_storage(path)
    return _LOCAL
