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
  for byte ranges (``Mapped.fetch``) before it cuts tensors, so that loading a part of a pack
  downloads only that part, in blocks of ``BLOCK_BYTES``, several requests in flight.
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
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO

from torchkeep.errors import StorageError
from torchkeep.storage._errors import storage_error
from torchkeep.storage._location import local_path
from torchkeep.storage._protocol import Mapped
from torchkeep.storage._upload import report, stream_upload
from torchkeep.storage._url import RemotePath, _options_key, remote_path, split_url

__all__ = ["BLOCK_BYTES", "RemoteStorage", "filesystem", "remote_storage", "remote_tree_bytes"]

BLOCK_BYTES = 8 << 20
"""Ranged reads fetch blocks of this size."""
PART_BYTES = 16 << 20
"""Uploads go up in parts of this size (S3 needs at least 5 MiB)."""
IN_FLIGHT = 4
"""Requests in flight per upload, and blocks read ahead per object."""
READ_BLOCK = 1 << 20
"""The block of a file object opened for reading (format detection reads a few bytes)."""


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
_POOL = ThreadPoolExecutor(max_workers=2 * IN_FLIGHT, thread_name_prefix="torchkeep-io")


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


def _oserror(exc: BaseException) -> OSError:
    """A failure of the store as an ``OSError`` with the nearest errno."""
    if isinstance(exc, OSError):
        return exc
    text = f"{type(exc).__name__}: {exc}"
    code = errno.EACCES if "AccessDenied" in text or "403" in text else errno.EIO
    return OSError(code, text)


def _from_store(exc: BaseException) -> bool:
    """Whether ``exc`` is the store's failure (the network, the server), not the writer's."""
    package = type(exc).__module__.split(".")[0]
    return isinstance(exc, OSError) or package in ("botocore", "aiobotocore", "aiohttp", "s3fs")


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
        err = _oserror(exc)
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
            if isinstance(exc, StorageError) or not _from_store(exc):
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
            err = _oserror(exc)
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
            raise _oserror(exc) from exc
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
            raise _oserror(exc) from exc
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
            raise _oserror(exc) from exc
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
        return Mapped(buffer=buffer, size=size, identity=None, fetch=_Ranges(self, p, buffer))

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


class _Ranges:
    """Fetches byte ranges of one object into its lazy buffer, in blocks, several at a time.

    Each call fetches the missing blocks of its range at once, and starts reading the next
    ``IN_FLIGHT`` blocks ahead in the background, so that a load that goes through the object
    tensor by tensor keeps requests in flight, while one that needs a part reads little more.
    """

    def __init__(self, store: RemoteStorage, path: str, buffer: mmap.mmap) -> None:
        self.store, self.path, self.buffer = store, path, buffer
        self.size = len(buffer)
        self.blocks = -(-self.size // BLOCK_BYTES)
        self.have: set[int] = set()
        self.pending: dict[int, Future[None]] = {}
        self.lock = threading.Lock()

    def __call__(self, start: int, end: int) -> None:
        end = min(end, self.size)
        if start >= end:
            return
        first, last = start // BLOCK_BYTES, (end - 1) // BLOCK_BYTES
        with self.lock:
            wanted = [self._start(b) for b in range(first, last + 1) if b not in self.have]
            for b in range(last + 1, min(last + 1 + IN_FLIGHT, self.blocks)):
                if b not in self.have and first > 0:  # read ahead once the reader moves on
                    self._start(b)
        for b, fut in wanted:
            fut.result()
            with self.lock:
                self.have.add(b)
                self.pending.pop(b, None)

    def _start(self, block: int) -> tuple[int, Future[None]]:
        fut = self.pending.get(block)
        if fut is None:
            fut = self.pending[block] = _POOL.submit(self._fetch, block)
        return block, fut

    def _fetch(self, block: int) -> None:
        lo = block * BLOCK_BYTES
        hi = min(lo + BLOCK_BYTES, self.size)
        data = self.store.read_bytes(self.path, lo, hi - lo)
        if len(data) != hi - lo:
            raise storage_error(
                OSError(errno.EIO, "short read"), self.path, "read the object", hint=None
            )
        self.buffer[lo:hi] = data
        report("download", self.path, hi - lo, self.size)
