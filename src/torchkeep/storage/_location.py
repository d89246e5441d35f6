"""Turning what a user passed as a location into a path: local, or a URL's :class:`RemotePath`.

Every public entry that takes a path (``save``, ``load``, ``inspect``, ``load_into``,
``save_model``, ``load_model``, ``convert``, ``verify``, ``scan``, ``diff``, ``export``,
``CheckpointManager``) turns it into a :class:`~pathlib.Path` through :func:`local_path` (or asks
:func:`~torchkeep.storage.storage_for`, which calls it). This is the seam where remote storage
attaches: ``Path("s3://bucket/run")`` would silently become the local folder ``./s3:/bucket/run``,
so a URL becomes a :class:`~torchkeep.storage.RemotePath` instead, which keeps the URL and its
``storage_options``, and which :func:`~torchkeep.storage.storage_for` routes to the remote store.

``file://`` URLs name local paths (percent-escapes decoded); a scheme no fsspec backend knows is
refused with a :class:`StorageError` that says what to install.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from torchkeep.storage._errors import storage_error
from torchkeep.storage._url import RemotePath, remote_path

__all__ = ["is_url", "local_path", "remember_options", "remembered_options", "with_options"]

# A scheme of two or more characters, so that a Windows drive (``C://x``, rare) is not one.
_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]+)://")


def is_url(location: str | os.PathLike[str]) -> bool:
    """True when ``location`` is written as a URL (``s3://``, ``gs://``, ``memory://``...), or is
    a :class:`~torchkeep.storage.RemotePath`."""
    if isinstance(location, RemotePath):
        return True
    return isinstance(location, str) and _URL.match(location) is not None


def _missing_backend(scheme: str) -> str | None:
    """Why no installed fsspec backend serves ``scheme``; ``None`` when one does."""
    try:
        import fsspec
    except ImportError:
        return "fsspec is not installed"
    if scheme not in fsspec.available_protocols():
        return "fsspec does not know the scheme"
    try:
        fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError) as exc:
        return str(exc).split("\n")[0]
    return None


def local_path(
    location: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> Path:
    """``location`` as a :class:`~pathlib.Path`: a local one, or a
    :class:`~torchkeep.storage.RemotePath` for a URL (``s3://``, ``gs://``, ``memory://``...).

    Args:
        location: a path, a path-like object, or a URL.
        storage_options: for a URL, the options of its fsspec filesystem (credentials,
            ``endpoint_url``...); they travel with every path derived from the result.

    Returns:
        The path, unchanged otherwise (no resolution, no ``~`` expansion); a ``file://`` URL
        gives its local path.

    Raises:
        StorageError: a URL whose scheme no installed fsspec backend knows.
    """
    if isinstance(location, RemotePath):
        if storage_options is None:
            return location
        return remote_path(str(location), storage_options)
    if isinstance(location, str):
        match = _URL.match(location)
        if match is not None:
            scheme = match["scheme"].lower()
            if scheme in ("file", "local"):
                return Path(unquote(urlsplit(location).path) or "/")
            missing = _missing_backend(scheme)
            if missing is not None:
                raise storage_error(
                    None,
                    location,
                    f"open {scheme}://",
                    message=f"no storage for {scheme}:// URLs: {missing}",
                    hint="pip install 'torchkeep[remote]' (fsspec, s3fs) and the fsspec backend "
                    "of that store (gcsfs for gs://, adlfs for az://), or pass a local path",
                )
            if storage_options is None:
                storage_options = remembered_options(location)
            else:
                remember_options(location, storage_options)
            return remote_path(location, storage_options)
    return Path(location)


_REMEMBERED: dict[str, dict[str, Any]] = {}


def remember_options(url: str, options: Mapping[str, Any]) -> None:
    """Remember ``options`` for ``url`` and what lies below it, for callers that pass a URL on
    as a string (a CLI subprocess, a reference resolved later)."""
    _REMEMBERED[url.rstrip("/")] = dict(options)


def remembered_options(url: str) -> dict[str, Any]:
    best = ""
    for known in _REMEMBERED:
        below = url == known or url.startswith((known + "/", known + "@"))
        if below and len(known) > len(best):
            best = known
    return dict(_REMEMBERED.get(best, {}))


def with_options(location: Any, storage_options: Mapping[str, Any] | None) -> Any:
    """``location`` with ``storage_options`` attached when it is a URL (a
    :class:`~torchkeep.storage.RemotePath`); anything else (a local path, a state dict, a model)
    comes back unchanged."""
    if storage_options is None or not isinstance(location, str | os.PathLike):
        return location
    if not is_url(location):
        return location
    return local_path(location, storage_options)
