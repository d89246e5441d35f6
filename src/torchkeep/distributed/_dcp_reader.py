"""torchkeep's DCP ``StorageReader``: a rank reads the shards it needs from a run's packs.

``dcp.load`` gets the checkpoint's ``Metadata`` rebuilt from the manifest's JSON
(``format/_sharded.py``), and its ``DefaultLoadPlanner`` works out, for this rank's DTensors at
the current world size, which parts of which saved chunks it needs: that is the resharding
(2 ranks saved, 3 or 1 load). Each chunk is read from its memory-mapped pack and checked
against its hash once; a value comes back from its JSON skeleton.
"""

from __future__ import annotations

import io
import os
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from torchkeep.errors import CorruptCheckpointError
from torchkeep.format import Manifest, RunReader, SafetensorsFile
from torchkeep.format._hash import hash_matches
from torchkeep.format._sharded import to_metadata, value_of


class PackReader(StorageReader):
    """Reads the shards of one sharded checkpoint (``manifest``) of the run ``reader``."""

    def __init__(self, reader: RunReader, manifest: Manifest, *, verify: bool = True) -> None:
        super().__init__()
        if manifest.sharded is None:
            raise CorruptCheckpointError("not a sharded checkpoint", path=str(manifest.path))
        self.reader, self.manifest, self.verify = reader, manifest, verify
        self.doc = manifest.sharded
        self._packs: dict[str, SafetensorsFile] = {}
        self._checked: set[str] = set()

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        pass

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return to_metadata(self.doc)  # type: ignore[no-any-return]  # DCP's Metadata, typed Any here

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *a: Any) -> None:
        pass

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False

    def shard(self, ref_key: str) -> torch.Tensor:
        """A saved chunk, memory-mapped from its pack, checked against its hash once."""
        source = str(self.manifest.path)
        ref = self.manifest.tensors.get(ref_key)
        if ref is None:
            raise CorruptCheckpointError(
                f"the sharded metadata refers to {ref_key!r}, which the manifest does not list",
                path=source,
                key=ref_key,
            )
        if ref.pack not in self._packs:
            path = self.reader.pack_path(ref.pack, self.manifest, ref_key)
            self._packs[ref.pack] = SafetensorsFile(str(path))
        t = self._packs[ref.pack].tensor(ref.key)
        if tuple(t.shape) != ref.shape or str(t.dtype).removeprefix("torch.") != ref.dtype:
            raise CorruptCheckpointError(
                f"shard {ref_key!r}: the pack holds {t.dtype} {tuple(t.shape)}, the manifest "
                f"says {ref.dtype} {ref.shape}",
                path=source,
                key=ref_key,
            )
        if self.verify and ref_key not in self._checked:
            if not hash_matches(t, ref.hash):
                raise CorruptCheckpointError(
                    f"shard {ref_key!r} does not match its hash: pack {ref.pack} was altered or "
                    "damaged",
                    path=source,
                    key=ref_key,
                    hint="load another checkpoint of the run (RUN@<step>); "
                    "torchkeep verify RUN lists every damaged tensor",
                )
            self._checked.add(ref_key)
        return t

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        storage = to_metadata(self.doc).storage_data
        entries = self.doc["entries"]
        for item in plan.items:
            fqn = item.storage_index.fqn
            if item.type == LoadItemType.BYTE_IO:
                value = value_of(entries[fqn], fqn, str(self.manifest.path))
                buffer = io.BytesIO()
                torch.save(value, buffer)  # plain values only: DCP's planner takes bytes
                buffer.seek(0)
                planner.load_bytes(item, buffer)
                continue
            where = storage[item.storage_index]
            chunk = self.shard(where["ref"])
            for dim, (start, n) in enumerate(zip(item.storage_offsets, item.lengths, strict=True)):
                chunk = chunk.narrow(dim, int(start), int(n))
            target = planner.resolve_tensor(item).detach()
            target.copy_(chunk)
            planner.commit_tensor(item, target)
        future: Future[None] = Future()
        future.set_result(None)
        return future
