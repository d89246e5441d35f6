"""Streamed uploads: the bytes a writer produces go up in parts while it writes.

On S3 (s3fs), :class:`S3Upload` cuts what it is given into parts of ``part_bytes`` and uploads
up to ``in_flight`` of them at once (a multipart upload), so memory holds at most
``in_flight + 1`` parts, never the whole state. The object exists only once
``complete_multipart_upload`` succeeds; if the writer raises, the upload is aborted and nothing
appears (a writer killed mid-upload leaves an unfinished upload, invisible to readers, which a
later writer's sweep aborts). A small object goes up as one PUT. A writer that seeks, and any
other store, fill a local temporary file first (see :func:`stream_upload`).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO

__all__ = ["S3Upload", "observe_transfers", "report", "stream_upload"]

Observer = Callable[[str, str, int, "int | None"], None]
_OBSERVERS: list[Observer] = []


@contextlib.contextmanager
def observe_transfers(observer: Observer) -> Iterator[None]:
    """Call ``observer(kind, path, nbytes, total)`` for each part uploaded (``kind`` "upload")
    and each block downloaded ("download") while the block runs (the CLI's progress bars)."""
    _OBSERVERS.append(observer)
    try:
        yield
    finally:
        _OBSERVERS.remove(observer)


def report(kind: str, path: str, nbytes: int, total: int | None) -> None:
    for observer in list(_OBSERVERS):
        with contextlib.suppress(Exception):  # a display must never fail a transfer
            observer(kind, path, nbytes, total)


_UPLOADS = ThreadPoolExecutor(max_workers=16, thread_name_prefix="torchkeep-upload")
MIN_PART = 5 << 20  # S3's smallest part (but the last)


class S3Upload:
    """A write-only file whose bytes go to ``s3://bucket/key`` as a multipart upload."""

    def __init__(self, fs: Any, path: str, part_bytes: int, in_flight: int) -> None:
        self.fs = fs
        self.path = path
        self.total: int | None = None
        self.bucket, self.key, _ = fs.split_path(path)
        self.part_bytes = max(part_bytes, MIN_PART)
        self.buffer = bytearray()
        self.written = 0
        self.upload_id: str | None = None
        self.parts: list[Future[dict[str, Any]]] = []
        self.slots = threading.BoundedSemaphore(in_flight)

    # the file interface a writer uses
    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        while view:
            take = min(self.part_bytes - len(self.buffer), len(view))
            self.buffer += view[:take]
            view = view[take:]
            if len(self.buffer) >= self.part_bytes:
                self._send(bytes(self.buffer))
                self.buffer.clear()
        self.written += n
        return n

    def tell(self) -> int:
        return self.written

    def flush(self) -> None:
        pass

    def seekable(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def _send(self, body: bytes) -> None:
        if self.upload_id is None:
            mpu = self.fs.call_s3("create_multipart_upload", Bucket=self.bucket, Key=self.key)
            self.upload_id = mpu["UploadId"]
        number = len(self.parts) + 1
        self.slots.acquire()  # at most in_flight parts held in memory
        self.parts.append(_UPLOADS.submit(self._part, number, body))
        for done in self.parts:  # fail early: an error in a part ends the upload now
            if done.done() and done.exception() is not None:
                done.result()

    def _part(self, number: int, body: bytes) -> dict[str, Any]:
        try:
            out = self.fs.call_s3(
                "upload_part",
                Bucket=self.bucket,
                Key=self.key,
                UploadId=self.upload_id,
                PartNumber=number,
                Body=body,
            )
            report("upload", self.path, len(body), self.total)
            return {"PartNumber": number, "ETag": out["ETag"]}
        finally:
            self.slots.release()

    def commit(self) -> None:
        if self.upload_id is None:
            self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=bytes(self.buffer))
            report("upload", self.path, len(self.buffer), len(self.buffer))
            return
        if self.buffer:
            self._send(bytes(self.buffer))
            self.buffer.clear()
        parts = [f.result() for f in self.parts]
        self.fs.call_s3(
            "complete_multipart_upload",
            Bucket=self.bucket,
            Key=self.key,
            UploadId=self.upload_id,
            MultipartUpload={"Parts": parts},
        )

    def abort(self) -> None:
        for f in self.parts:
            f.cancel()
        for f in self.parts:
            if not f.cancelled():
                with contextlib.suppress(BaseException):
                    f.exception()
        if self.upload_id is not None:
            with contextlib.suppress(Exception):  # if it fails, a later sweep aborts it
                self.fs.call_s3(
                    "abort_multipart_upload",
                    Bucket=self.bucket,
                    Key=self.key,
                    UploadId=self.upload_id,
                )


def _is_s3(fs: Any) -> bool:
    return hasattr(fs, "call_s3") and hasattr(fs, "split_path")


def _s3_upload(fs: Any, path: str, write: Callable[[Any], None], part_bytes: int, n: int) -> None:
    upload = S3Upload(fs, path, part_bytes, n)
    try:
        write(upload)
        upload.commit()
    except BaseException:
        upload.abort()
        raise


def stream_upload(
    fs: Any,
    path: str,
    write: Callable[[BinaryIO], None],
    *,
    sequential: bool,
    part_bytes: int,
    in_flight: int,
) -> None:
    """Upload what ``write`` writes to ``path``; the object appears whole, or not at all.

    On S3 a ``sequential`` writer streams straight into the multipart upload. Any other writer
    (one that seeks), and any other store, fills a local temporary file first: it is then
    streamed the same way on S3, or handed to the store's ``put_file`` (fsspec's buffered files
    of some stores show their bytes before they are closed, so they are never written into).
    """
    if sequential and _is_s3(fs):
        _s3_upload(fs, path, write, part_bytes, in_flight)
        return
    with tempfile.NamedTemporaryFile(prefix=".torchkeep-spool-") as spool:
        write(spool)  # type: ignore[arg-type]  # a binary file
        spool.flush()
        size = spool.seek(0, 2)
        spool.seek(0)
        if _is_s3(fs):

            def copy(up: S3Upload) -> None:
                up.total = size
                shutil.copyfileobj(spool, up, part_bytes)

            _s3_upload(fs, path, copy, part_bytes, in_flight)
        else:
            fs.put_file(spool.name, path)
            report("upload", path, size, size)
