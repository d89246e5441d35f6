"""Sharded checkpoints of a run: DCP's metadata as JSON, and their shards read back whole.

A checkpoint saved by the ranks of an FSDP2 / DTensor job (``distributed/_dcp_writer.py``) is a
manifest like any other, with one more field, ``"sharded"``: DCP's ``Metadata``, kept as JSON
(no pickle anywhere)::

    "sharded": {
      "entries": {
        "model.w": {"tensor": {"dtype": "float32", "size": [8, 4], "requires_grad": false,
                               "chunks": [{"offsets": [0, 0], "sizes": [4, 4],
                                           "ref": "model.w@0,0"}, ...]}},
        "optimizer.param_groups.0.lr": {"value": <skeleton of a plain value>}
      },
      "paths": {"model.w": ["model", "w"], ...}       # DCP's planner_data: the nested keys
    }

Each chunk's ``ref`` is a key of the manifest's tensor table: the shard's pack, key, dtype,
shape and xxh3 hash, so retention, ``verify`` and the sweep of packs treat shards as tensors.
Non-tensor values (DCP's bytes items, which it would ``torch.save``) are stored as the JSON
skeleton of plain values; an object that has none is refused when saved.

:func:`assemble` rebuilds the full state in one process, one full tensor at a time, from shards
that are memory-mapped: each chunk is hash-checked where it lies in its pack, copied into its
slice of the preallocated full tensor, and its pages dropped at once (``madvise``), so a load
holds one copy of the weights plus one chunk. :func:`full_tensor` assembles one tensor alone,
for writers that stream a checkpoint tensor by tensor (``convert``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from torchkeep.errors import CorruptCheckpointError
from torchkeep.format._dtypes import tensor_dtype_from_name
from torchkeep.format._unflatten import unflatten


def _bad(source: str | None, what: str, key: str | None = None) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"invalid sharded metadata: {what}",
        path=source,
        key=key,
        hint="the manifest was altered or written by an incompatible tool; load another "
        "checkpoint of the run (RUN@<step>)",
    )


def check_sharded(doc: Any, refs: Mapping[str, Any], source: str | None) -> dict[str, Any]:
    """The ``"sharded"`` field of a manifest, checked against its tensor table."""
    if not isinstance(doc, dict) or not isinstance(doc.get("entries"), dict):
        raise _bad(source, "no entries")
    paths = doc.get("paths", {})
    if not isinstance(paths, dict):
        raise _bad(source, "paths is not an object")
    for fqn, entry in doc["entries"].items():
        if isinstance(entry, dict) and "value" in entry:
            continue
        try:
            t = entry["tensor"]
            tensor_dtype_from_name(t["dtype"], path=source, key=fqn)
            size = [int(n) for n in t["size"]]
            for chunk in t["chunks"]:
                ref = refs[chunk["ref"]]
                offsets, sizes = list(chunk["offsets"]), list(chunk["sizes"])
                if len(offsets) != len(size) or len(sizes) != len(size):
                    raise ValueError("a chunk's rank differs from the tensor's")
                if list(ref.shape) != sizes or ref.dtype != t["dtype"]:
                    raise ValueError(f"chunk {chunk['ref']!r} disagrees with its tensor entry")
                if any(o < 0 or o + n > s for o, n, s in zip(offsets, sizes, size, strict=True)):
                    raise ValueError("a chunk lies outside its tensor")
        except CorruptCheckpointError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise _bad(source, f"entry {fqn!r} is malformed ({exc})", str(fqn)) from exc
    return doc


def value_of(entry: Mapping[str, Any], fqn: str, source: str | None) -> Any:
    """A stored plain value (DCP's bytes item), decoded from its skeleton."""

    def no_tensor(node: dict[str, Any]) -> torch.Tensor:
        raise _bad(source, f"value {fqn!r} refers to a tensor", fqn)

    return unflatten(entry["value"], no_tensor, source=source)


def to_metadata(doc: Mapping[str, Any]) -> Any:
    """DCP's ``Metadata`` of a sharded checkpoint (for ``dcp.load``); ``storage_data`` maps each
    chunk's ``MetadataIndex`` to its ``ref`` (a value's to the entry itself)."""
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    entries: dict[str, Any] = {}
    storage: dict[Any, Any] = {}
    for fqn, entry in doc["entries"].items():
        if "value" in entry:
            entries[fqn] = BytesStorageMetadata()
            storage[MetadataIndex(fqn)] = {"value": entry["value"]}
            continue
        t = entry["tensor"]
        dtype = tensor_dtype_from_name(t["dtype"], path=None, key=fqn)
        chunks = []
        for c in t["chunks"]:
            offsets = torch.Size(c["offsets"])
            chunks.append(ChunkStorageMetadata(offsets=offsets, sizes=torch.Size(c["sizes"])))
            storage[MetadataIndex(fqn, offsets)] = {"ref": c["ref"]}
        entries[fqn] = TensorStorageMetadata(
            properties=TensorProperties(dtype=dtype, requires_grad=bool(t.get("requires_grad"))),
            size=torch.Size(t["size"]),
            chunks=chunks,
        )
    paths = {k: tuple(v) for k, v in doc.get("paths", {}).items()}
    return Metadata(state_dict_metadata=entries, planner_data=paths, storage_data=storage)


def assemble(
    doc: Mapping[str, Any],
    shard: Callable[[str], torch.Tensor],
    *,
    source: str | None = None,
    only: Callable[[str], bool] | None = None,
    release: Callable[[str, torch.Tensor], None] | None = None,
    finish: Callable[[torch.Tensor], torch.Tensor] | None = None,
    placeholder: Callable[[str, Mapping[str, Any]], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """The full state of a sharded checkpoint as one nested dict.

    ``shard(ref)`` gives a chunk (checked against its hash by the caller), mapped from its
    pack; once copied into its place, ``release(ref, chunk)`` may drop its pages, so that the
    peak is the full tensors plus one chunk. Each full tensor is allocated once and filled chunk
    by chunk (every element covered once), then passed through ``finish`` (a cast, a move)
    before the next is assembled. ``only(top_key)`` restricts it to some top-level entries.
    With ``placeholder(fqn, spec)``, each full tensor is what it gives and nothing is read (a
    ``meta`` tensor to describe a checkpoint, ``inspect``; a stand-in ``convert`` streams).
    """
    flat: dict[str, Any] = {}
    paths = doc.get("paths", {})
    for fqn, entry in doc["entries"].items():
        path = list(paths.get(fqn, [fqn]))
        if only is not None and not only(str(path[0])):
            continue
        if "value" in entry:
            flat[fqn] = value_of(entry, fqn, source)
            continue
        if placeholder is not None:
            flat[fqn] = placeholder(fqn, entry["tensor"])
            continue
        full = full_tensor(entry["tensor"], fqn, shard, source=source, release=release)
        flat[fqn] = full if finish is None else finish(full)
    return nest(flat, paths)


def meta_tensor(fqn: str, spec: Mapping[str, Any], source: str | None = None) -> torch.Tensor:
    """A ``meta`` tensor of a full tensor's dtype and shape (no data)."""
    dtype = tensor_dtype_from_name(spec["dtype"], path=source, key=fqn)
    return torch.empty([int(n) for n in spec["size"]], dtype=dtype, device="meta")


def full_tensor(
    spec: Mapping[str, Any],
    fqn: str,
    shard: Callable[[str], torch.Tensor],
    *,
    source: str | None = None,
    release: Callable[[str, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """One full tensor of a sharded checkpoint (its ``"tensor"`` entry), filled from its chunks."""
    dtype = tensor_dtype_from_name(spec["dtype"], path=source, key=fqn)
    full = torch.empty([int(n) for n in spec["size"]], dtype=dtype)
    covered = 0
    for chunk in spec["chunks"]:
        region = full
        for dim, (start, n) in enumerate(zip(chunk["offsets"], chunk["sizes"], strict=True)):
            region = region.narrow(dim, int(start), int(n))
        src = shard(chunk["ref"])
        region.copy_(src.reshape(region.shape))
        if release is not None:
            release(chunk["ref"], src)
        del src
        covered += math.prod(chunk["sizes"])
    if covered != full.numel():
        raise _bad(source, f"the chunks of {fqn!r} cover {covered} of {full.numel()}", fqn)
    return full


def nest(flat: dict[str, Any], paths: Mapping[str, Any]) -> dict[str, Any]:
    """Flat DCP keys back into the nested dicts they were saved from (``planner_data``)."""
    out: dict[str, Any] = {}
    for fqn, value in flat.items():
        path = list(paths.get(fqn, [fqn]))
        node: dict[Any, Any] = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return _lists(out)  # type: ignore[no-any-return]  # _lists returns Any; the top is a dict


def _lists(node: Any) -> Any:
    """Nodes keyed by integers (DCP flattens lists such as ``param_groups``) back into lists."""
    if not isinstance(node, dict):
        return node
    node = {k: _lists(v) for k, v in node.items()}
    if node and all(type(k) is int for k in node) and sorted(node) == list(range(len(node))):
        return [node[i] for i in range(len(node))]
    return {str(k): v for k, v in node.items()}
