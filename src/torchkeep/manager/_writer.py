"""Writing one checkpoint into a run: staging, hashing, packs, the manifest, garbage collection.

The commit protocol (see ``format/_run.py``): the new tensors go into a pack (temp file, fsync,
rename, fsync of the directory), then the manifest is renamed into ``checkpoints/``, the single
commit point. A tensor whose bytes the run already holds (same xxh3-128 hash, dtype and shape) is
referenced, not written again. Packs
are deleted only when no committed manifest refers to them, and always after the manifests; only
files the run wrote (a pack's name and a pack's header) are ever deleted, never through a link.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import math
import os
import platform
import re
import secrets
import socket
import stat
import struct
import subprocess
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import torch

from torchkeep._version import __version__
from torchkeep.errors import StorageError
from torchkeep.format import (
    FORMAT_VERSION,
    MANIFEST_DIR,
    PACK_DIR,
    Flattened,
    HashingWriter,
    Manifest,
    TensorRef,
    manifest_name,
    metadata_json,
    seal_json,
    tensor_hash,
    write_pack,
)
from torchkeep.format._artifact import METADATA_KEY, PACK_KIND
from torchkeep.format._confine import open_folder
from torchkeep.format._dtypes import dtype_name
from torchkeep.format._run import check_layout
from torchkeep.format._safetensors import HEADER_LIMIT
from torchkeep.storage import atomic_write
from torchkeep.storage._local import storage_error, sweep_temporaries

# A small tensor equal to one in an older pack is written again rather than referenced: it
# costs next to nothing, and a reference would keep the whole older pack alive on disk.
MIN_SHARED_BYTES = 64 * 1024
_LEGACY_PACK_FIELDS = {
    "format_version",
    "torchkeep_version",
    "torch_version",
    "skeleton",
    "raw",
    "metadata",
}
_PACK_NAME = re.compile(r"^\d{10,}-[0-9a-f]{8}\.safetensors$")  # as write_checkpoint names them


def clean_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """Metrics as JSON numbers: 0-d tensors and numpy scalars become floats, NaN becomes None."""
    out: dict[str, Any] = {}
    for name, value in (metrics or {}).items():
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().item() if value.numel() == 1 else value.tolist()
        elif hasattr(value, "item") and callable(value.item):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        out[str(name)] = value
    return metadata_json(out)


def system_info() -> dict[str, Any]:
    """Where and with what a checkpoint was written (the git commit of the working directory)."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
        commit = result.stdout.strip() or None if result.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "torch_version": str(torch.__version__),
        "torchkeep_version": __version__,
        "git_commit": commit,
    }


class Hasher:
    """Hashes of many tensors, several at once (the hash releases the GIL on large buffers)."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None

    def hashes(self, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
        try:
            if self._pool is None:
                workers = min(4, os.cpu_count() or 1)
                self._pool = ThreadPoolExecutor(workers, thread_name_prefix="torchkeep-hash")
            digests = list(self._pool.map(tensor_hash, tensors.values()))
        except RuntimeError:  # the interpreter is exiting: no new threads, hash here
            digests = [tensor_hash(t) for t in tensors.values()]
        return dict(zip(tensors, digests, strict=True))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class Stager:
    """Copies a state into host buffers allocated once and reused by later saves.

    Buffers are pinned when the source is on a GPU, so the copy runs at full bandwidth. The
    caller makes sure the previous write has finished before staging again.
    """

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def stage(self, flat: Flattened) -> Flattened:
        staged: dict[str, torch.Tensor] = {}
        on_gpu = False
        for key, t in flat.tensors.items():
            t = t.detach()
            buf = self.buffers.get(key)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                pin = t.is_cuda and torch.cuda.is_available()
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
            try:
                buf.copy_(t, non_blocking=t.is_cuda)
            except (RuntimeError, NotImplementedError):  # dtypes without copy kernels
                buf = t.to("cpu", copy=True)
            on_gpu = on_gpu or t.is_cuda
            staged[key] = buf
        if on_gpu:
            torch.cuda.synchronize()
        self.buffers = staged  # buffers of tensors no longer saved are dropped
        return Flattened(skeleton=flat.skeleton, tensors=staged)


def write_checkpoint(
    root: Path,
    step: int,
    flat: Flattened,
    hashes: Mapping[str, str],
    known: Iterable[TensorRef],
    known_packs: Mapping[str, tuple[int, str]],
    *,
    metrics: dict[str, Any],
    metadata: dict[str, Any],
    system: dict[str, Any],
    models: dict[str, Any] | None = None,
) -> Manifest:
    """Write the new tensors of ``flat`` into a pack and commit its manifest.

    Args:
        known: the tensors the run already stores, to reference instead of writing again.
        models: how to rebuild the app's models (``describe_models``); recorded when not empty.

    Returns:
        The committed manifest.
    """
    check_layout(root)  # never write through a link swapped in since the run was opened
    known = list(known)
    index = {(r.hash, r.dtype, r.shape): r for r in known}
    pack = f"{step:010d}-{secrets.token_hex(4)}.safetensors"
    refs: dict[str, TensorRef] = {}
    new: dict[str, torch.Tensor] = {}
    for key, t in flat.tensors.items():
        ref = TensorRef(
            pack=pack,
            key=key,
            dtype=dtype_name(t.dtype),
            shape=tuple(t.shape),
            nbytes=t.numel() * t.element_size(),
            hash=hashes[key],
        )
        existing = index.get((ref.hash, ref.dtype, ref.shape))
        if existing is not None and (existing.pack == pack or ref.nbytes >= MIN_SHARED_BYTES):
            refs[key] = existing  # the run already holds these bytes
        else:
            refs[key] = index[(ref.hash, ref.dtype, ref.shape)] = ref
            new[key] = t.detach()
    pack_path = root / PACK_DIR / pack
    digests = {name: known_packs[name] for name in {r.pack for r in refs.values()} - {pack}}
    if new:

        def write(f: BinaryIO) -> None:
            hashing = HashingWriter(f)
            write_pack(hashing, new)  # type: ignore[arg-type]  # write_pack only calls write(), which it has
            digests[pack] = (hashing.nbytes, hashing.digest)

        try:
            atomic_write(pack_path, write)
        except StorageError as exc:
            # A pack in place is no commit: the save failed, and nothing refers to the pack.
            exc.committed = False
            with contextlib.suppress(OSError):
                pack_path.unlink()
            raise
    now = datetime.datetime.now(datetime.UTC)
    document: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "time": now.timestamp(),
        "metrics": metrics,
        "metadata": metadata,
        "system": {"created": now.isoformat(), **system},
        "skeleton": flat.skeleton,
        "tensors": {k: {**_fields(r), "shape": list(r.shape)} for k, r in refs.items()},
        "packs": {name: {"bytes": n, "hash": h} for name, (n, h) in sorted(digests.items())},
    }
    if models:
        document["models"] = models
    manifest_path = root / MANIFEST_DIR / manifest_name(step)
    try:
        text = seal_json(json.dumps(document, separators=(",", ":")).encode())
        atomic_write(manifest_path, lambda f: write_bytes(f, text))  # the commit point
    except BaseException as exc:
        # Once renamed into place the manifest is committed, and its pack must stay.
        if not (isinstance(exc, StorageError) and exc.committed):
            with contextlib.suppress(OSError):
                pack_path.unlink()
        raise
    return Manifest(
        path=manifest_path,
        step=step,
        time=document["time"],
        metrics=metrics,
        metadata=metadata,
        skeleton=flat.skeleton,
        tensors=refs,
        pack_digests=digests,
        models=dict(models or {}),
    )


def collect_packs(root: Path, manifests: Iterable[Manifest]) -> None:
    """Delete packs that no committed manifest refers to, and only packs this run wrote.

    A file is deleted only when its name is a pack's name, it is a regular file (a link is never
    followed, nor removed), and its header says it is a torchkeep pack: a name alone is no proof.
    Deletes go through a descriptor of the real ``packs/`` folder, so a link swapped in for the
    folder cannot send them elsewhere.
    """
    used = {ref.pack for m in manifests for ref in m.tensors.values()}
    try:
        folder = open_folder(root, PACK_DIR)
    except FileNotFoundError:
        return
    try:
        for name in os.listdir(folder):
            if name in used or not _PACK_NAME.match(name):
                continue
            try:
                st = os.stat(name, dir_fd=folder, follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and _is_pack(folder, name):
                    os.unlink(name, dir_fd=folder)
            except FileNotFoundError:
                continue
        _fsync_folder(folder)
    except OSError as exc:
        raise storage_error(exc, root / PACK_DIR, "delete unused packs") from exc
    finally:
        os.close(folder)


def _is_pack(folder: int, name: str) -> bool:
    """Whether ``folder/name`` is a pack written by torchkeep: its header says so."""
    fd = os.open(name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0), dir_fd=folder)
    with os.fdopen(fd, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return False
        (n,) = struct.unpack("<Q", head)
        if n > HEADER_LIMIT:
            return False
        try:
            header = json.loads(f.read(n))
            document = json.loads(header["__metadata__"][METADATA_KEY])
        except (ValueError, KeyError, TypeError):
            return False
    if not isinstance(document, dict):
        return False
    # Packs written before the marker: exactly write_pack's fields (tk.save adds "hashes").
    legacy = set(document) == _LEGACY_PACK_FIELDS and document.get("metadata") == {}
    return document.get("kind") == PACK_KIND or legacy


def delete_manifests(root: Path, manifests: Iterable[Manifest]) -> None:
    """Delete committed manifests (retention), through the real ``checkpoints/`` folder."""
    folder = open_folder(root, MANIFEST_DIR)
    try:
        for manifest in manifests:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(manifest_name(manifest.step), dir_fd=folder)
        _fsync_folder(folder)
    except OSError as exc:
        raise storage_error(exc, root / MANIFEST_DIR, "delete pruned checkpoints") from exc
    finally:
        os.close(folder)


def _fsync_folder(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:  # as storage.fsync_dir: some filesystems cannot fsync a directory
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise


def sweep(root: Path, manifests: Iterable[Manifest]) -> None:
    """Remove what crashed writers left: temporary files and unreferenced packs.

    Refuses a run whose folders are links first: the sweep must never reach outside the run.
    """
    check_layout(root)
    for folder in (root, root / MANIFEST_DIR, root / PACK_DIR):
        for entry in os.listdir(folder):
            if ".tkp-" in entry and entry.startswith("."):
                sweep_temporaries(folder / entry.split(".tkp-")[0][1:])
    collect_packs(root, manifests)


def _fields(ref: TensorRef) -> dict[str, Any]:
    return {
        "pack": ref.pack,
        "key": ref.key,
        "dtype": ref.dtype,
        "shape": ref.shape,
        "nbytes": ref.nbytes,
        "hash": ref.hash,
    }


def write_bytes(f: BinaryIO, data: bytes) -> None:
    f.write(data)
