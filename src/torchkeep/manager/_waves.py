"""Writing one checkpoint a wave of tensors at a time: a pack per wave, then the manifest.

An overlapped save whose state does not fit its ``staging_limit`` stages a wave, writes it into
a pack of its own, and reuses the host memory for the next wave. The commit order is the one of
``_writer.write_checkpoint``: every pack is written (temp file, fsync, rename, directory fsync)
before the manifest is renamed into place, the single commit point; a failure before it deletes
the packs this save wrote, and a crash leaves only packs that no manifest names (swept by the
next writer). A tensor whose bytes the run already holds is referenced, not written again.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from torchkeep.errors import StorageError
from torchkeep.format import (
    MANIFEST_DIR,
    PACK_DIR,
    HashingWriter,
    Manifest,
    TensorRef,
    check_layout,
    encode_manifest,
    manifest_name,
    pack_name,
    write_pack,
)
from torchkeep.format._dtypes import dtype_name
from torchkeep.manager._writer import MIN_SHARED_BYTES, write_bytes
from torchkeep.storage import storage_for


class PackWaves:
    """The packs of one checkpoint, a wave at a time, then its manifest (:meth:`commit`)."""

    def __init__(self, root: Path, step: int, committed: Iterable[Manifest]) -> None:
        check_layout(root)  # never write through a link swapped in since the run was opened
        committed = list(committed)
        self.root = root
        self.step = step
        self.index = {(r.hash, r.dtype, r.shape): r for m in committed for r in m.tensors.values()}
        self.known = {name: digest for m in committed for name, digest in m.pack_digests.items()}
        self.refs: dict[str, TensorRef] = {}
        self.digests: dict[str, tuple[int, str]] = {}
        self.written: list[Path] = []

    def write_wave(self, tensors: dict[str, torch.Tensor], hashes: dict[str, str]) -> None:
        """Write the tensors of one wave whose bytes the run does not hold yet into a new pack."""
        pack = pack_name(self.step)
        new: dict[str, torch.Tensor] = {}
        for key, t in tensors.items():
            ref = TensorRef(
                pack=pack,
                key=key,
                dtype=dtype_name(t.dtype),
                shape=tuple(t.shape),
                nbytes=t.numel() * t.element_size(),
                hash=hashes[key],
            )
            existing = self.index.get((ref.hash, ref.dtype, ref.shape))
            mine = existing is not None and existing.pack in {pack, *self.digests}
            if existing is not None and (mine or ref.nbytes >= MIN_SHARED_BYTES):
                self.refs[key] = existing
            else:
                self.refs[key] = self.index[(ref.hash, ref.dtype, ref.shape)] = ref
                new[key] = t
        if not new:
            return
        path = self.root / PACK_DIR / pack

        def write(f: BinaryIO) -> None:
            hashing = HashingWriter(f)
            write_pack(hashing, new)  # type: ignore[arg-type]  # write_pack only calls write(), which it has
            self.digests[pack] = (hashing.nbytes, hashing.digest)

        try:
            storage_for(path).write_atomic(str(path), write)
        except StorageError as exc:
            exc.committed = False
            with contextlib.suppress(OSError):
                storage_for(path).delete(str(path))
            raise
        self.written.append(path)

    def commit(
        self,
        skeleton: Any,
        *,
        metrics: dict[str, Any],
        metadata: dict[str, Any],
        system: dict[str, Any],
        models: dict[str, Any],
    ) -> Manifest:
        """Rename the manifest into place: the commit point. Deletes this save's packs on a
        failure before it."""
        own = set(self.digests)
        digests = dict(self.digests)
        for name in {r.pack for r in self.refs.values()} - own:
            digests[name] = self.known[name]
        manifest = Manifest(
            path=self.root / MANIFEST_DIR / manifest_name(self.step),
            step=self.step,
            time=time.time(),
            metrics=metrics,
            metadata=metadata,
            skeleton=skeleton,
            tensors=dict(self.refs),
            pack_digests=digests,
            models=dict(models),
        )
        try:
            text = encode_manifest(manifest, system=system)
            store = storage_for(manifest.path)
            store.write_atomic(str(manifest.path), lambda f: write_bytes(f, text))
        except BaseException as exc:
            if not (isinstance(exc, StorageError) and exc.committed):
                self.abort()
            raise
        return manifest

    def abort(self) -> None:
        """Delete the packs this save wrote (nothing names them)."""
        for path in self.written:
            with contextlib.suppress(OSError):
                storage_for(path).delete(str(path))
        self.written = []
