"""The fsspec filesystem of a scheme, and its failures as ``OSError``."""

from __future__ import annotations

import errno
import os
from typing import Any

from torchkeep.storage._errors import storage_error

__all__ = ["filesystem", "from_store", "oserror"]


def filesystem(scheme: str, options: dict[str, Any]) -> Any:
    """``fsspec.filesystem(scheme, **options)``; for S3 the endpoint also comes from
    ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (boto reads the credentials itself)."""
    try:
        import fsspec
    except ImportError as exc:
        raise storage_error(
            None,
            f"{scheme}://",
            f"open {scheme}://",
            message=f"{scheme}:// needs fsspec, which is not installed",
            hint="pip install 'torchkeep[remote]' (fsspec, s3fs)",
        ) from exc
    options = dict(options)
    if scheme in ("s3", "s3a") and "endpoint_url" not in options:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["endpoint_url"] = endpoint
    try:
        return fsspec.filesystem(scheme, **options)
    except (ImportError, ValueError) as exc:
        raise storage_error(
            None,
            f"{scheme}://",
            f"open {scheme}://",
            message=f"no filesystem for {scheme}://: {exc}",
            hint="install the fsspec backend for it (s3fs for s3://, gcsfs for gs://, adlfs "
            "for az://), or pip install 'torchkeep[remote]'",
        ) from exc


def oserror(exc: BaseException) -> OSError:
    """A failure of the store as an ``OSError`` with the nearest errno."""
    if isinstance(exc, OSError):
        return exc
    text = f"{type(exc).__name__}: {exc}"
    code = errno.EACCES if "AccessDenied" in text or "403" in text else errno.EIO
    return OSError(code, text)


def from_store(exc: BaseException) -> bool:
    """Whether ``exc`` is the store's failure (the network, the server), not the writer's."""
    package = type(exc).__module__.split(".")[0]
    return isinstance(exc, OSError) or package in ("botocore", "aiobotocore", "aiohttp", "s3fs")
