"""`RemoteStorage`: the :class:`~torchkeep.storage.Storage` protocol on any fsspec filesystem.

Object stores have no rename, so commits are single objects. A PUT (or the completion of a
multipart upload) is atomic: readers see the old object or the whole new one. Rules:

- ``write_atomic`` streams the bytes as they are written: parts of ``PART_BYTES`` go up as a
  multipart upload (``IN_FLIGHT`` parts at once on S3), so the state is never copied whole in
  memory; the object appears only when the upload completes. A failure aborts the upload.
- ``create_exclusive`` is a conditional create (``If-None-Match: *`` on S3, fsspec's
  ``mode="create"`` elsewhere): of two writers of one manifest exactly one wins. After an
  ambiguous answer (a retried request, a 409) the object is read back: if it holds our bytes,
  the create was ours.
- ``map`` reads lazily: the buffer is anonymous memory of the object's size, and the reader asks
  for byte ranges (``Mapped.fetch``) before it reads them, so that loading a part of a pack
  downloads only that part (rounded to ``PAGE_BYTES``); a reader that goes through many ranges
  announces them (``Mapped.prefetch``) and they come in requests of up to ``BLOCK_BYTES``,
  several in flight.
- ``lock`` is a lease object (``_lease.py``), not ``flock``.

Failures become ``StorageError`` through :func:`~torchkeep.storage.storage_error`; reads keep
``FileNotFoundError`` for a missing object, as the protocol says.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import mmap
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, BinaryIO

from torchkeep.errors import StorageError
from torchkeep.storage._errors import storage_error
from torchkeep.storage._fsspec import filesystem, from_store, oserror
from torchkeep.storage._location import local_path
from torchkeep.storage._protocol import Mapped
from torchkeep.storage._ranges import BLOCK_BYTES, IN_FLIGHT, PART_BYTES, READ_BLOCK, Ranges
from torchkeep.storage._upload import stream_upload
from torchkeep.storage._url import RemotePath, _options_key, remote_path, split_url

__all__ = ["BLOCK_BYTES", "RemoteStorage", "filesystem", "remote_storage", "remote_tree_bytes"]


def grace_seconds() -> float:
    """How old an object another process left must be before it is swept:
    ``TORCHKEEP_SWEEP_GRACE_SECONDS``, by default twice the lease (120 s)."""
    from torchkeep.storage._lease import lease_seconds

    try:
        return max(float(os.environ.get("TORCHKEEP_SWEEP_GRACE_SECONDS", "")), 0.0)
    except ValueError:
        return 2 * lease_seconds()


_STORES: dict[tuple[str, str], RemoteStorage] = {}
_STORES_LOCK = threading.Lock()


def remote_storage(location: str | os.PathLike[str]) -> RemoteStorage:
    """The store of a URL (one per scheme and options, shared)."""
    if not isinstance(location, RemotePath):
        found = local_path(os.fspath(location))  # with the options remembered for the URL
        location = found if isinstance(found, RemotePath) else remote_path(os.fspath(location))
    options = type(location).storage_options
    key = (location.scheme, _options_key(options))
    with _STORES_LOCK:
        store = _STORES.get(key)
        if store is None:
            store = _STORES[key] = RemoteStorage(location.scheme, options)
        return store


class RemoteStorage:
    """:class:`~torchkeep.storage.Storage` on an fsspec filesystem (``s3://``, ``memory://``...)."""

    def __init__(self, scheme: str, options: dict[str, Any]) -> None:
        self.scheme = scheme
        self.options = options
        self.fs = filesystem(scheme, options)
        self.written: set[str] = set()  # objects this process wrote (swept without grace)

    def __repr__(self) -> str:
        return f"RemoteStorage({self.scheme!r})"

    def _p(self, path: str | os.PathLike[str]) -> str:
        text = os.fspath(path)
        if "://" in text:
            return f"{self.scheme}://{split_url(text)[1]}"
        return f"{self.scheme}://{text.strip('/')}"

    def _fail(self, exc: BaseException, path: str, action: str) -> StorageError:
        if isinstance(exc, StorageError):
            return exc
        err = oserror(exc)
        hint = None
        if err.errno == errno.EIO:
            hint = "the store failed or the connection dropped: check the endpoint and retry"
        return storage_error(err, path, action, hint=hint)

    def _forget(self, path: str) -> None:
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(path)

    # -- committing ------------------------------------------------------------------------------

    def write_atomic(
        self,
        path: str | os.PathLike[str],
        write: Callable[[BinaryIO], None],
        *,
        sequential: bool = False,
    ) -> None:
        p = self._p(path)
        try:
            stream_upload(
                self.fs,
                p,
                write,
                sequential=sequential,
                part_bytes=PART_BYTES,
                in_flight=IN_FLIGHT,
            )
        except Exception as exc:
            if isinstance(exc, StorageError) or not from_store(exc):
                raise  # the writer's own error (an unstorable value...), unchanged
            raise self._fail(exc, p, "write the object") from exc
        finally:
            self._forget(p)
        self.written.add(p)

    def create_exclusive(
        self, path: str | os.PathLike[str], write: Callable[[BinaryIO], None]
    ) -> bool:
        p = self._p(path)
        buffer = io.BytesIO()
        write(buffer)
        data = buffer.getvalue()
        try:
            self.fs.pipe_file(p, data, mode="create")
        except FileExistsError:
            return self._is_ours(p, data)
        except Exception as exc:
            err = oserror(exc)
            if err.errno in (errno.EBUSY, errno.EINVAL):  # 409 conflict, 412 precondition
                return self._is_ours(p, data)
            raise self._fail(exc, p, "create the object") from exc
        finally:
            self._forget(p)
        self.written.add(p)
        return True

    def _is_ours(self, p: str, data: bytes) -> bool:
        """After a refused create: True only when the object holds exactly our bytes (our own
        earlier attempt landed, and its answer was lost)."""
        try:
            theirs = self.fs.cat_file(p)
        except FileNotFoundError as exc:  # refused, yet not there: a race still in progress
            raise storage_error(
                OSError(errno.EBUSY, "conditional create conflicted"),
                p,
                "create the object",
                hint="another writer is creating the same object; retry",
            ) from exc
        except Exception as exc:
            raise self._fail(exc, p, "read the object back") from exc
        return hashlib.sha256(theirs).digest() == hashlib.sha256(data).digest()

    def append(self, path: str | os.PathLike[str], data: bytes, *, durable: bool = False) -> None:
        p = self._p(path)  # objects cannot grow: read, then write the whole object again
        try:
            try:
                old = self.fs.cat_file(p)
            except FileNotFoundError:
                old = b""
            self.fs.pipe_file(p, old + data)
        except Exception as exc:
            raise oserror(exc) from exc
        finally:
            self._forget(p)

    @contextlib.contextmanager
    def staging_directory(self, dest: str | os.PathLike[str]) -> Iterator[str]:
        staging = tempfile.mkdtemp(prefix=".torchkeep-stage-")  # built locally, then uploaded
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def publish(self, files: Sequence[str | os.PathLike[str]], directory: str) -> list[str]:
        moved = []
        for f in files:  # in order: the last one is the commit point
            target = f"{self._p(directory)}/{os.path.basename(os.fspath(f))}"
            try:
                self.fs.put_file(os.fspath(f), target)
            except Exception as exc:
                raise self._fail(exc, target, "upload the new files") from exc
            finally:
                self._forget(target)
            moved.append(target)
        return moved

    def makedirs(self, path: str | os.PathLike[str]) -> None:
        p = self._p(path)
        try:
            self.fs.makedirs(p, exist_ok=True)
        except FileExistsError:
            pass
        except Exception as exc:
            raise self._fail(exc, p, "create the directory") from exc

    # -- reading ---------------------------------------------------------------------------------

    def info(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        p = self._p(path)
        self._forget(p)
        try:
            info: dict[str, Any] = self.fs.info(p)
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise oserror(exc) from exc
        mtime = info.get("LastModified") or info.get("mtime") or info.get("created") or 0
        info["mtime"] = mtime.timestamp() if hasattr(mtime, "timestamp") else float(mtime)
        return info

    def open_read(self, path: str | os.PathLike[str]) -> BinaryIO:
        p = self._p(path)
        try:
            f: BinaryIO = self.fs.open(p, "rb", block_size=READ_BLOCK, cache_type="readahead")
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise oserror(exc) from exc
        return f

    def read_bytes(
        self, path: str | os.PathLike[str], start: int | None = None, length: int | None = None
    ) -> bytes:
        p = self._p(path)
        end = None if length is None else (start or 0) + length
        try:
            data: bytes = self.fs.cat_file(p, start=start, end=end)
        except Exception as exc:
            raise self._fail(exc, p, "read the object") from exc
        return data

    def map(self, path: str | os.PathLike[str]) -> Mapped:
        p = self._p(path)
        info = self.info(p)
        size = int(info.get("size") or 0)
        if size == 0:
            return Mapped(buffer=None, size=0, identity=None)
        buffer = mmap.mmap(-1, size)  # anonymous: pages cost memory only once fetched
        ranges = Ranges(self, p, buffer)
        return Mapped(buffer, size, None, fetch=ranges, prefetch=ranges.prefetch)

    def size(self, path: str | os.PathLike[str]) -> int:
        return int(self.info(path).get("size") or 0)

    def exists(self, path: str | os.PathLike[str]) -> bool:
        p = self._p(path)
        self._forget(p)
        try:
            return bool(self.fs.exists(p))
        except Exception as exc:
            raise self._fail(exc, p, "look for the object") from exc

    # -- removing --------------------------------------------------------------------------------

    def delete(self, path: str | os.PathLike[str]) -> None:
        p = self._p(path)
        try:
            self.fs.rm_file(p)
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise self._fail(exc, p, "delete the object") from exc
        finally:
            self._forget(p)

    def delete_files(
        self,
        directory: str | os.PathLike[str],
        names: Iterable[str],
        *,
        check: Callable[[BinaryIO], bool] | None = None,
        action: str = "delete the files",
        grace: bool = False,
    ) -> list[str]:
        folder = self._p(directory)
        removed: list[str] = []
        for name in names:
            if not name or "/" in name or name in (".", ".."):
                raise ValueError(f"{name!r} is not a plain file name")
            p = f"{folder}/{name}"
            try:
                if grace and not self._sweepable(p):
                    continue
                if check is not None:
                    with self.open_read(p) as f:
                        if not check(f):
                            continue
                self.fs.rm_file(p)
            except FileNotFoundError:
                continue
            except Exception as exc:
                raise self._fail(exc, p, action) from exc
            finally:
                self._forget(p)
            removed.append(name)
        return removed

    def _sweepable(self, p: str) -> bool:
        """An object another process wrote is garbage only once it is older than the grace
        period: its writer may still be about to commit a manifest that refers to it."""
        if p in self.written:
            return True
        return time.time() - float(self.info(p)["mtime"]) >= grace_seconds()

    def sweep_temporaries(self, directory: str | os.PathLike[str]) -> list[str]:
        """Abort the multipart uploads a dead writer left under ``directory`` (S3), once they
        are older than the grace period."""
        folder = self._p(directory)
        aborted: list[str] = []
        call = getattr(self.fs, "call_s3", None)
        if call is None:
            return aborted
        bucket, _, prefix = split_url(folder)[1].partition("/")
        try:
            listed = call("list_multipart_uploads", Bucket=bucket, Prefix=prefix + "/")
            for upload in listed.get("Uploads", []):
                if "/" in upload["Key"][len(prefix) + 1 :]:
                    continue  # in a sub-folder: that folder's sweep
                started = upload["Initiated"].timestamp()
                if time.time() - started < grace_seconds():
                    continue
                call(
                    "abort_multipart_upload",
                    Bucket=bucket,
                    Key=upload["Key"],
                    UploadId=upload["UploadId"],
                )
                aborted.append(f"{self.scheme}://{bucket}/{upload['Key']}")
        except Exception as exc:
            raise self._fail(exc, folder, "abort unfinished uploads") from exc
        return aborted

    def remove_tree(self, path: str | os.PathLike[str]) -> None:
        p = self._p(path)
        try:
            self.fs.rm(p, recursive=True)
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise self._fail(exc, p, "remove the directory") from exc
        finally:
            self._forget(p)

    # -- locking ---------------------------------------------------------------------------------

    def lock(self, path: str | os.PathLike[str]) -> Any:
        from torchkeep.storage._lease import Lease

        return Lease(self, self._p(path))

    def list(self, path: str | os.PathLike[str] = "") -> list[str]:
        p = self._p(path)
        self._forget(p)
        try:
            entries = self.fs.ls(p, detail=False)
        except FileNotFoundError:
            return []
        except Exception as exc:
            raise self._fail(exc, p, "list the directory") from exc
        names = {os.fspath(e).rstrip("/").rsplit("/", 1)[-1] for e in entries}
        return sorted(n for n in names if n)


def remote_tree_bytes(location: str | os.PathLike[str]) -> int:
    """Bytes of every object under ``location`` (``du``)."""
    store = remote_storage(location)
    p = store._p(location)
    try:
        return int(store.fs.du(p, total=True))
    except FileNotFoundError:
        return 0
    except Exception as exc:
        raise store._fail(exc, p, "measure the run") from exc
