"""torchkeep's DCP ``StorageWriter``: one rank's shards into one safetensors pack, hashed.

``dcp.save`` plans with its ``DefaultSavePlanner`` (which shards of which DTensors this rank
holds) and hands each write item here. This writer puts every tensor shard into one pack of the
rank (``packs/<step>-<tag>.safetensors``, written atomically through ``storage``), hashes each
shard (xxh3-128, as every tensor of a run), and turns each non-tensor value (DCP's bytes items,
which it would ``torch.save``) into the JSON skeleton of plain values, refusing what has none.

It runs with ``no_dist=True``: each rank plans and writes only its own part, and the ranks meet
through the job's store with a deadline (``_group.py``), not DCP's collectives, so a dead rank
is named within ``barrier_timeout`` rather than hanging the others. What it gathered
(:attr:`part`: the rank's DCP entries, tensor refs and pack digest) goes to rank 0, whose
manifest, written only after every rank's pack is durable, is the commit (``_sharded.py``).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from torchkeep.errors import StorageError, UnsupportedValueError
from torchkeep.format import PACK_DIR, HashingWriter, TensorRef, flatten, pack_name, write_pack
from torchkeep.format._dtypes import dtype_name
from torchkeep.storage import storage_for


@dataclass
class ShardPart:
    """One rank's part of a sharded save: DCP entries, tensor refs and the pack's digest."""

    entries: dict[str, Any] = field(default_factory=dict)
    paths: dict[str, list[Any]] = field(default_factory=dict)
    refs: dict[str, TensorRef] = field(default_factory=dict)
    packs: dict[str, tuple[int, str]] = field(default_factory=dict)


def shard_key(fqn: str, offsets: Any) -> str:
    """The tensor-table key of a shard: its DCP key and where it starts."""
    return f"{fqn}@{','.join(str(int(o)) for o in offsets)}"


class PackWriter(StorageWriter):
    """Writes this rank's shards of step ``step`` into one pack of the run at ``root``."""

    def __init__(
        self, root: Path, step: int, rank: int, hashes: Any, *, skip_replicated: bool
    ) -> None:
        super().__init__()
        self.root, self.step, self.rank = root, step, rank
        self.hashes = hashes  # dict of tensors -> dict of xxh3 digests (the manager's Hasher)
        self.skip_replicated = skip_replicated  # ranks > 0: rank 0 writes whole tensors
        self.part = ShardPart()

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self.part = ShardPart()

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        pass

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return plans

    def storage_meta(self) -> StorageMeta | None:
        return None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        tensors: dict[str, torch.Tensor] = {}
        results: list[WriteResult] = []
        part = self.part
        for item in plan.items:
            fqn = item.index.fqn
            if item.type == WriteItemType.BYTE_IO:
                if self.skip_replicated:
                    continue
                # lookup_object: DefaultSavePlanner's, not in the SavePlanner protocol
                value = planner.lookup_object(item.index)  # type: ignore[attr-defined]  # see above
                try:
                    flat = flatten(value)
                except UnsupportedValueError as exc:
                    raise UnsupportedValueError(
                        f"sharded state entry {fqn!r} cannot be stored without pickle: "
                        f"{exc.message}",
                        key=fqn,
                        hint="keep only tensors and plain values (numbers, strings, lists, "
                        "dicts) in the state dicts of sharded models and optimizers",
                    ) from exc
                if flat.tensors:
                    raise UnsupportedValueError(
                        f"sharded state entry {fqn!r} is a value holding tensors",
                        key=fqn,
                        hint="store tensors as tensors of the state dict, not inside objects",
                    )
                part.entries[fqn] = {"value": flat.skeleton}
                results.append(WriteResult(index=item.index, size_in_bytes=0, storage_data=None))
                continue
            data = item.tensor_data
            assert data is not None
            chunk = data.chunk
            if self.skip_replicated and list(chunk.sizes) == list(data.size):
                continue  # a whole (replicated) tensor: rank 0 writes it
            t = planner.resolve_data(item)
            assert isinstance(t, torch.Tensor)
            key = shard_key(fqn, chunk.offsets)
            tensors[key] = t.detach().to("cpu").contiguous()
            entry = part.entries.setdefault(
                fqn,
                {
                    "tensor": {
                        "dtype": dtype_name(data.properties.dtype),
                        "size": list(data.size),
                        "requires_grad": bool(data.properties.requires_grad),
                        "chunks": [],
                    }
                },
            )
            entry["tensor"]["chunks"].append(
                {"offsets": list(chunk.offsets), "sizes": list(chunk.sizes), "ref": key}
            )
            results.append(WriteResult(index=item.index, size_in_bytes=0, storage_data=key))
        self._write_pack(tensors)
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def _write_pack(self, tensors: dict[str, torch.Tensor]) -> None:
        if not tensors:
            return
        digests = self.hashes(tensors)
        pack = pack_name(self.step)
        path = self.root / PACK_DIR / pack

        def write(f: BinaryIO) -> None:
            hashing = HashingWriter(f)
            write_pack(hashing, tensors)  # type: ignore[arg-type]  # only write() is called
            self.part.packs[pack] = (hashing.nbytes, hashing.digest)

        try:
            storage_for(path).write_atomic(str(path), write)  # durable before it is reported
        except StorageError:
            with contextlib.suppress(OSError):
                storage_for(path).delete(str(path))
            raise
        for key, t in tensors.items():
            self.part.refs[key] = TensorRef(
                pack=pack,
                key=key,
                dtype=dtype_name(t.dtype),
                shape=tuple(t.shape),
                nbytes=t.numel() * t.element_size(),
                hash=digests[key],
            )

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        paths = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
        self.part.paths = {
            fqn: list(path) for fqn, path in paths.items() if fqn in self.part.entries
        }
