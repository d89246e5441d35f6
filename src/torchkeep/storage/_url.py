"""A URL that upper layers can treat as a path: :class:`RemotePath`.

Every layer above ``storage/`` builds locations with ``pathlib`` (``root / "checkpoints"``,
``path.parent``, ``path.name``). ``Path("s3://bucket/run")`` would collapse the ``//`` and name the
local folder ``s3:/bucket/run``. A :class:`RemotePath` is a ``PosixPath`` that keeps its URL: it
joins and names like a path, ``str()`` and ``os.fspath()`` give the URL back, and its filesystem
queries (``exists``, ``is_dir``, ``is_file``, ``stat``, ``lstat``, ``iterdir``) ask its store,
never the local disk. Its ``storage_options`` travel with it: every path derived from it
(``/``, ``parent``, ``with_name``) is of the same class, which holds them, so that
:func:`~torchkeep.storage.storage_for` of any file of a run reaches the same store with the same
credentials.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from collections.abc import Generator, Mapping
from pathlib import PosixPath
from typing import Any, ClassVar

__all__ = ["RemotePath", "remote_path", "split_url"]

_CLASSES: dict[str, type[RemotePath]] = {}
_CLASSES_LOCK = threading.Lock()


def split_url(url: str) -> tuple[str, str]:
    """``"s3://bucket/run/"`` -> ``("s3", "bucket/run")``."""
    scheme, _, rest = url.partition("://")
    return scheme.lower(), rest.strip("/")


def _options_key(options: Mapping[str, Any]) -> str:
    try:
        return json.dumps(options, sort_keys=True, default=repr)
    except (TypeError, ValueError):
        return repr(sorted(options.items(), key=lambda kv: str(kv[0])))


def remote_path(url: str, storage_options: Mapping[str, Any] | None = None) -> RemotePath:
    """The :class:`RemotePath` for ``url``, carrying ``storage_options``."""
    options = dict(storage_options or {})
    key = _options_key(options)
    with _CLASSES_LOCK:
        cls = _CLASSES.get(key)
        if cls is None:
            cls = type("RemotePath", (RemotePath,), {"storage_options": options})
            _CLASSES[key] = cls
    scheme, rest = split_url(url)
    return cls(f"{scheme}:/{rest}" if rest else f"{scheme}:")


class RemotePath(PosixPath):
    """A location in an object store (``s3://bucket/run``), spelled and joined like a path."""

    storage_options: ClassVar[dict[str, Any]] = {}
    """Options for the store (``fsspec.filesystem(scheme, **storage_options)``)."""

    @property
    def scheme(self) -> str:
        return self.parts[0][:-1]

    @property
    def key(self) -> str:
        """The path inside the store, without the scheme: ``bucket/run``."""
        return "/".join(self.parts[1:])

    def __str__(self) -> str:
        return f"{self.scheme}://{self.key}"

    def __fspath__(self) -> str:
        return str(self)

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def as_posix(self) -> str:
        return str(self)

    def as_uri(self) -> str:
        return str(self)

    def is_absolute(self) -> bool:
        return True

    def resolve(self, strict: bool = False) -> RemotePath:
        return self

    def absolute(self) -> RemotePath:
        return self

    def expanduser(self) -> RemotePath:
        return self

    # -- queries, answered by the store ----------------------------------------------------------

    def _store(self) -> Any:
        from torchkeep.storage._remote import remote_storage

        return remote_storage(self)

    def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
        info = self._store().info(str(self))
        mode = stat.S_IFDIR | 0o755 if info["type"] == "directory" else stat.S_IFREG | 0o644
        mtime = float(info.get("mtime", 0.0))
        size = int(info.get("size") or 0)
        # The object's version stands in for the inode: an object replaced (saved again) is
        # another "file", as the readers' identity checks expect.
        version = str(info.get("ETag") or info.get("etag") or info.get("generation") or "")
        ino = int.from_bytes(
            hashlib.blake2b(f"{version}|{mtime}|{size}".encode(), digest_size=7).digest()
        )
        return os.stat_result((mode, ino, 1, 1, 0, 0, size, 0, mtime, mtime))

    def lstat(self) -> os.stat_result:
        return self.stat()  # an object store has no links

    def exists(self, *, follow_symlinks: bool = True) -> bool:
        try:
            self.stat()
        except OSError:
            return False
        return True

    def is_dir(self) -> bool:
        try:
            return stat.S_ISDIR(self.stat().st_mode)
        except OSError:
            return False

    def is_file(self) -> bool:
        try:
            return stat.S_ISREG(self.stat().st_mode)
        except OSError:
            return False

    def is_symlink(self) -> bool:
        return False

    def iterdir(self) -> Generator[RemotePath, None, None]:
        for name in self._store().list(str(self)):
            yield self / name

    def read_bytes(self) -> bytes:
        data: bytes = self._store().read_bytes(str(self))
        return data

    def read_text(self, encoding: str | None = None, errors: str | None = None) -> str:
        return self.read_bytes().decode(encoding or "utf-8", errors or "strict")
