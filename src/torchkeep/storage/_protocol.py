"""The `Storage` protocol: the few operations every backend must offer.

Paths are ``str``, not ``pathlib.Path``: a location may be ``s3://bucket/run``, which ``Path``
would mangle (``s3:/bucket/run``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import BinaryIO, Protocol, runtime_checkable


@runtime_checkable
class Storage(Protocol):
    """A place to keep files, each one written atomically."""

    def write_atomic(self, path: str, write: Callable[[BinaryIO], None]) -> None:
        """Write a file so that readers see either the old content or the complete new one."""
        ...

    def read_bytes(self, path: str) -> bytes:
        """Read a whole (small) file."""
        ...

    def exists(self, path: str) -> bool:
        """True when a committed file exists at ``path``."""
        ...

    def list(self, path: str) -> list[str]:
        """Names of the entries in directory ``path``, sorted."""
        ...

    def delete(self, path: str) -> None:
        """Remove a file; a missing file is not an error."""
        ...
