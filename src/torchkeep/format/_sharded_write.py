"""A sharded checkpoint of a run written as one torchkeep safetensors file, tensor by tensor.

``convert RUN@latest model.safetensors`` of a checkpoint saved in shards (FSDP2/DTensor) never
holds the assembled state: the structure is flattened with a stand-in for each full tensor (a
zero-stride view of one element: its dtype and shape, no data), and the writer then asks for
each tensor's bytes in turn.

The header comes first and records every tensor's hash, so each tensor is read twice: once to
hash it, once to write it. A tensor sharded by rows (FSDP2 shards dim 0) is the concatenation of
its chunks in offset order, so it is hashed and written chunk by chunk, never assembled; any
other layout is assembled one full tensor at a time (``format/_sharded.full_tensor``). Every chunk
is checked against its hash where it lies in its mapped pack, and its pages dropped once used:
the peak is one chunk (or one full tensor), not the weights.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, BinaryIO

import torch
import xxhash

from torchkeep.errors import CorruptCheckpointError
from torchkeep.format._artifact import SafetensorsFile, _write_sealed, metadata_json
from torchkeep.format._dtypes import tensor_dtype_from_name
from torchkeep.format._hash import hash_matches, tensor_hash
from torchkeep.format._location import cast
from torchkeep.format._run import Manifest, RunReader
from torchkeep.format._safetensors import raw_dtypes, tensor_bytes
from torchkeep.format._sharded import assemble, full_tensor
from torchkeep.format._skeleton import flatten
from torchkeep.format._versions import version_block


class _Chunks:
    """The chunks of one manifest, read from their mapped packs and checked against their hash."""

    def __init__(self, reader: RunReader, manifest: Manifest) -> None:
        self.reader, self.manifest = reader, manifest
        self.packs: dict[str, SafetensorsFile] = {}

    def __call__(self, key: str) -> torch.Tensor:
        ref, source = self.manifest.tensors[key], str(self.manifest.path)  # checked when read
        if ref.pack not in self.packs:
            path = self.reader.pack_path(ref.pack, self.manifest, key)
            self.packs[ref.pack] = SafetensorsFile(str(path))
        t = self.packs[ref.pack].tensor(ref.key)
        if tuple(t.shape) != ref.shape or str(t.dtype).removeprefix("torch.") != ref.dtype:
            raise CorruptCheckpointError(
                f"shard {key!r}: the pack holds {t.dtype} {tuple(t.shape)}, "
                f"the manifest says {ref.dtype} {ref.shape}",
                path=source,
                key=key,
            )
        if not hash_matches(t, ref.hash):
            raise CorruptCheckpointError(
                f"shard {key!r} does not match its hash: pack {ref.pack} was altered or damaged",
                path=source,
                key=key,
                hint="convert another checkpoint of the run (RUN@<step>); "
                "torchkeep verify RUN lists every damaged tensor",
            )
        return t

    def release(self, key: str, t: torch.Tensor) -> None:
        self.packs[self.manifest.tensors[key].pack].mapped.release(t)


def _by_rows(spec: Mapping[str, Any]) -> list[Mapping[str, Any]] | None:
    """The chunks in row order when they are whole rows that tile dim 0 exactly, else None."""
    size = [int(n) for n in spec["size"]]
    if not size:
        return None
    chunks = sorted(spec["chunks"], key=lambda c: int(c["offsets"][0]))
    row = 0
    for c in chunks:
        offsets, sizes = [int(n) for n in c["offsets"]], [int(n) for n in c["sizes"]]
        if offsets[0] != row or any(offsets[1:]) or sizes[1:] != size[1:]:
            return None
        row += sizes[0]
    return chunks if row == size[0] else None


def write_sharded(
    f: BinaryIO,
    reader: RunReader,
    manifest: Manifest,
    metadata: dict[str, Any] | None,
    *,
    dtype: torch.dtype | None = None,
) -> None:
    """Write checkpoint ``manifest`` (saved in shards) to ``f`` as a torchkeep safetensors file
    holding its full state, as :func:`~torchkeep.format.write_artifact` of the loaded state would,
    streaming each full tensor from its chunks (see the module docstring)."""
    assert manifest.sharded is not None
    source = str(manifest.path)
    chunks = _Chunks(reader, manifest)
    state = reader.load(manifest, dtype=dtype, verify=True, shards=False)
    specs: dict[int, tuple[str, Mapping[str, Any]]] = {}

    def stand_in(fqn: str, spec: Mapping[str, Any]) -> torch.Tensor:
        one = cast(torch.empty((), dtype=tensor_dtype_from_name(spec["dtype"], path=source)), dtype)
        t = one.expand([int(n) for n in spec["size"]])
        specs[id(t)] = (fqn, spec)
        return t

    state.update(assemble(manifest.sharded, chunks, source=source, placeholder=stand_in))
    flat = flatten(state)

    def pieces(key: str) -> Iterator[memoryview]:
        t = flat.tensors[key]
        if id(t) not in specs:
            yield tensor_bytes(t)
            return
        fqn, spec = specs[id(t)]
        rows = _by_rows(spec)
        if rows is None:
            full = full_tensor(spec, fqn, chunks, source=source, release=chunks.release)
            yield tensor_bytes(cast(full, dtype))
            return
        for c in rows:
            chunk = chunks(c["ref"])
            yield tensor_bytes(cast(chunk, dtype))
            chunks.release(c["ref"], chunk)

    def digest(key: str) -> str:
        if id(flat.tensors[key]) not in specs:
            return tensor_hash(flat.tensors[key])
        h = xxhash.xxh3_128()
        for piece in pieces(key):
            h.update(piece)
        return "xxh3_128:" + h.hexdigest()

    document = {
        **version_block(),
        "skeleton": flat.skeleton,
        "raw": raw_dtypes(flat.tensors),
        "metadata": metadata_json(metadata),
        "hashes": {key: digest(key) for key in flat.tensors},
    }
    _write_sealed(f, flat.tensors, document, pieces)
