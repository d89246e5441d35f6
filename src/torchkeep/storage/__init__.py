"""Where bytes live.

The storage layer knows nothing about tensors: it writes files atomically, reads, lists and deletes
them. ``local`` covers the local filesystem; remote stores (fsspec) come later behind the same
:class:`Storage` protocol.
"""

from torchkeep.storage._local import (
    LocalStorage,
    atomic_write,
    fsync_dir,
    publish,
    staging_directory,
)
from torchkeep.storage._location import is_url, local_path
from torchkeep.storage._protocol import Storage

__all__ = [
    "LocalStorage",
    "Storage",
    "atomic_write",
    "fsync_dir",
    "is_url",
    "local_path",
    "publish",
    "staging_directory",
]
