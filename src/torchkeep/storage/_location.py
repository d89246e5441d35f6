"""Turning what a user passed as a location into a local path, or refusing it.

Every public entry that takes a path (``save``, ``load``, ``inspect``, ``load_into``,
``save_model``, ``load_model``, ``convert``, ``verify``, ``scan``, ``diff``, ``export``,
``CheckpointManager``) turns it into a :class:`~pathlib.Path` through :func:`local_path` (or asks
:func:`~torchkeep.storage.storage_for`, which calls it). This is
the seam where remote storage attaches: ``Path("s3://bucket/run")`` would silently become the
local folder ``./s3:/bucket/run``, so a URL is refused here with a :class:`StorageError` until a
remote :class:`~torchkeep.storage.Storage` exists, and will be routed to it after.

``file://`` URLs are refused too, rather than mapped: a ``file://`` location mixed with run
references (``file:///runs/x@best``), percent-escapes and hosts has more than one reading, and the
local path it names is one copy-paste away (the hint prints it).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from torchkeep.storage._errors import storage_error

__all__ = ["is_url", "local_path"]

# A scheme of two or more characters, so that a Windows drive (``C://x``, rare) is not one.
_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]+)://")


def is_url(location: str | os.PathLike[str]) -> bool:
    """True when ``location`` is written as a URL (``s3://``, ``gs://``, ``memory://``...)."""
    return isinstance(location, str) and _URL.match(location) is not None


def local_path(location: str | os.PathLike[str]) -> Path:
    """``location`` as a local :class:`~pathlib.Path`.

    Args:
        location: a path, or a path-like object.

    Returns:
        The path, unchanged otherwise (no resolution, no ``~`` expansion).

    Raises:
        StorageError: ``location`` is a URL (``s3://``, ``gs://``, ``memory://``, ``file://``...);
            remote storage is not supported yet.
    """
    if isinstance(location, str):
        match = _URL.match(location)
        if match is not None:
            scheme = match["scheme"].lower()
            if scheme == "file":
                local = unquote(urlsplit(location).path) or "/"
                raise storage_error(
                    None,
                    location,
                    "open a file:// URL",
                    message="file:// URLs are not accepted; torchkeep takes local paths",
                    hint=f"pass the local path instead: {local}",
                )
            raise storage_error(
                None,
                location,
                f"open {scheme}://",
                message=f"remote storage ({scheme}://) is not supported yet; torchkeep reads and "
                "writes local paths only",
                hint="copy the files to a local directory first (aws s3 cp, gcloud storage "
                "cp...) and pass its path",
            )
    return Path(location)
