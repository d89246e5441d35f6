"""Writing one checkpoint into a run: staging, hashing, and the order of the commit.

The commit protocol (see ``format/_run``): the new tensors go into a pack (temp file, fsync,
rename, fsync of the directory), then the manifest is renamed into ``checkpoints/``, the single
commit point. A tensor whose bytes the run already holds (same xxh3-128 hash, dtype and shape) is
referenced, not written again. What the bytes of packs and manifests are is the format's
(``write_pack``, ``encode_manifest``); when they are written, and what is undone when a write
fails, is decided here. Deleting files (retention, garbage) is ``_gc.py``'s.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import torch

from torchkeep.errors import StorageError
from torchkeep.format import (
    MANIFEST_DIR,
    PACK_DIR,
    Flattened,
    HashingWriter,
    Manifest,
    TensorRef,
    check_layout,
    encode_manifest,
    manifest_name,
    pack_name,
    tensor_hash,
    write_pack,
)
from torchkeep.format._dtypes import dtype_name
from torchkeep.storage import storage_error, storage_for

# A small tensor equal to one in an older pack is written again rather than referenced: it
# costs next to nothing, and a reference would keep the whole older pack alive on disk.
MIN_SHARED_BYTES = 64 * 1024


class Hasher:
    """Hashes of many tensors, several at once (the hash releases the GIL on large buffers)."""

    def __init__(self, initializer: Callable[[], object] | None = None) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._initializer = initializer  # run by each hashing thread when it starts

    def hashes(self, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
        try:
            if self._pool is None:
                workers = min(4, os.cpu_count() or 1)
                self._pool = ThreadPoolExecutor(
                    workers, thread_name_prefix="torchkeep-hash", initializer=self._initializer
                )
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
    committed: Iterable[Manifest],
    *,
    metrics: dict[str, Any],
    metadata: dict[str, Any],
    system: dict[str, Any],
    models: dict[str, Any] | None = None,
    extra: tuple[Mapping[str, TensorRef], Mapping[str, tuple[int, str]]] | None = None,
    sharded: dict[str, Any] | None = None,
) -> Manifest:
    """Write the new tensors of ``flat`` into a pack and commit its manifest.

    Args:
        committed: the run's committed manifests: their tensors are referenced, not written
            again.
        models: how to rebuild the app's models (``describe_models``); recorded when not empty.
        extra: tensors other ranks wrote into packs of their own, and those packs' digests
            (``distributed/_ddp.py``): listed in the manifest as they are.
        sharded: DCP's metadata of shards the ranks wrote (``format/_sharded.py``).

    Returns:
        The committed manifest.
    """
    check_layout(root)  # never write through a link swapped in since the run was opened
    committed = list(committed)
    index = {(r.hash, r.dtype, r.shape): r for m in committed for r in m.tensors.values()}
    known_packs = {name: digest for m in committed for name, digest in m.pack_digests.items()}
    pack = pack_name(step)
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
    if extra is not None:
        refs.update(extra[0])
        digests.update(extra[1])
    if new:

        def write(f: BinaryIO) -> None:
            hashing = HashingWriter(f)
            write_pack(hashing, new)  # type: ignore[arg-type]  # write_pack only calls write(), which it has
            digests[pack] = (hashing.nbytes, hashing.digest)

        try:
            # sequential: write_pack only writes, so a remote pack streams up as it is written
            storage_for(pack_path).write_atomic(str(pack_path), write, sequential=True)
        except StorageError as exc:
            # A pack in place is no commit: the save failed, and nothing refers to the pack.
            exc.committed = False
            with contextlib.suppress(OSError):
                storage_for(pack_path).delete(str(pack_path))
            raise
    manifest = Manifest(
        path=root / MANIFEST_DIR / manifest_name(step),
        step=step,
        time=time.time(),
        metrics=metrics,
        metadata=metadata,
        skeleton=flat.skeleton,
        tensors=refs,
        pack_digests=digests,
        models=dict(models or {}),
        sharded=sharded,
    )
    try:
        text = encode_manifest(manifest, system=system)
        store = storage_for(manifest.path)
        if any(m.step == step for m in committed):  # this writer saves its own step again
            store.write_atomic(str(manifest.path), lambda f: write_bytes(f, text))
        elif not store.create_exclusive(str(manifest.path), lambda f: write_bytes(f, text)):
            # The commit point is a conditional create: another writer committed this step.
            raise storage_error(
                FileExistsError(errno.EEXIST, "the manifest exists"),
                manifest.path,
                f"commit step {step}",
                message=f"another writer committed step {step} of this run first; this save "
                "is not committed",
                hint="one writer per run: stop the other writer, and resume from the run",
            )
    except BaseException as exc:
        # Once renamed into place the manifest is committed, and its pack must stay.
        if not (isinstance(exc, StorageError) and exc.committed):
            with contextlib.suppress(OSError):
                storage_for(pack_path).delete(str(pack_path))
        raise
    return manifest


def write_bytes(f: BinaryIO, data: bytes) -> None:
    f.write(data)
