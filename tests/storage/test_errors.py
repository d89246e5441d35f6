"""One errno-to-hint table for every StorageError."""

from __future__ import annotations

import errno
import os

import pytest

from torchkeep import StorageError, TorchkeepError
from torchkeep.storage import storage_error
from torchkeep.storage._errors import HINTS


@pytest.mark.parametrize("code", sorted(HINTS))
def test_each_errno_gets_its_hint(code: int) -> None:
    exc = OSError(code, os.strerror(code))
    err = storage_error(exc, "/data/a.bin", "write the file")
    assert isinstance(err, StorageError) and isinstance(err, OSError)
    assert isinstance(err, TorchkeepError)
    assert err.errno == code and err.__cause__ is exc and err.hint == HINTS[code]
    assert err.path == "/data/a.bin"
    assert str(err).startswith(f"/data/a.bin: could not write the file: {os.strerror(code)}")


def test_unknown_errno_and_overrides() -> None:
    err = storage_error(OSError(errno.ENXIO, "No such device"), "p", "read the file")
    assert err.hint and "disk" in err.hint
    err = storage_error(OSError(errno.EROFS, "ro"), "p", "lock", message="read-only", hint="x")
    assert err.message == "read-only" and err.hint == "x" and err.errno == errno.EROFS


def test_a_refusal_without_a_system_call() -> None:
    err = storage_error(None, "s3://b/r", "open s3://", message="not yet", hint="copy it")
    assert (
        err.errno is None
        and err.__cause__ is None
        and str(err) == "s3://b/r: not yet\n  hint: copy it"
    )
