"""What the readers share: listing a loaded structure's tensors, sharded indexes, model descriptions.

The readers themselves, and the dispatch from a reference to one, are in ``_sources.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchkeep.errors import (
    CorruptCheckpointError,
)
from torchkeep.format._artifact import check_format_version
from torchkeep.format._detect import MODEL_FILE
from torchkeep.format._dtypes import dtype_name
from torchkeep.format._hash import seal_ok
from torchkeep.format._info import TensorInfo
from torchkeep.format._json import parse_json
from torchkeep.format._unflatten import unflatten
from torchkeep.format._values import optimizer_tensor_paths
from torchkeep.storage import storage_for

WEIGHTS_FILE = "model.safetensors"


def shard_files(index: Path) -> tuple[dict[str, str], dict[str, Any]]:
    with storage_for(index).open_read(str(index)) as f:
        data = f.read()
    doc = parse_json(data, what="sharded index", path=str(index))
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CorruptCheckpointError(
            "weight_map must map tensor names to file names", path=str(index)
        )
    for name in set(weight_map.values()):
        if Path(name).name != name or name in ("", ".", "..") or "\\" in name:
            raise CorruptCheckpointError(
                f"shard {name!r} points outside the index's directory",
                path=str(index),
                hint="shards must be plain file names beside the index; the index may be hostile",
            )
    metadata = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    return weight_map, metadata


def _no_tensor(node: dict[str, Any]) -> torch.Tensor:
    raise CorruptCheckpointError("a model config must not refer to tensors")


def read_model_description(directory: Path) -> tuple[str, dict[str, Any]]:
    """The class path and constructor config recorded by ``save_model`` in ``directory``.

    The description ends with a digest of its own bytes (as a run's manifest does), so that any
    changed byte is detected, even one that leaves valid JSON (a digit of the config).
    """
    source = str(directory)
    with storage_for(directory).open_read(str(directory / MODEL_FILE)) as f:
        data = f.read()
    doc = parse_json(data, what="model description", path=source)
    if not isinstance(doc, dict) or not isinstance(doc.get("class"), str):
        raise CorruptCheckpointError(f"{MODEL_FILE} names no class", path=source)
    check_format_version(doc.get("format_version"), path=source)
    if not seal_ok(data):
        raise CorruptCheckpointError(
            f"{MODEL_FILE}: its bytes do not match its digest (altered or damaged)",
            path=source,
            hint="save the model again with torchkeep.save_model, or restore the directory "
            "from a copy",
        )
    return model_description(doc, source=source)


def model_description(doc: Mapping[str, Any], *, source: str) -> tuple[str, dict[str, Any]]:
    """The class path and config of a model description (``save_model``'s, or a manifest's).

    ``doc`` is ``{"class": "pkg.mod:Name", "config": <skeleton without tensors>}``.
    """
    if not isinstance(doc.get("class"), str):
        raise CorruptCheckpointError("the model description names no class", path=source)
    config = unflatten(doc.get("config", {"$": "dict", "v": {}}), _no_tensor, source=source)
    if not isinstance(config, dict):
        raise CorruptCheckpointError("the model config is not a dict", path=source)
    return doc["class"], config


def tensors_by_path(obj: Any) -> dict[str, torch.Tensor]:
    """Every tensor (and numeric numpy array) of a nested structure by dotted path, in order."""
    out: dict[str, torch.Tensor] = {}

    def walk(x: Any, path: tuple[str, ...]) -> None:
        if isinstance(x, np.ndarray) and x.dtype.kind in "biufc":
            try:
                x = torch.from_numpy(x)
            except (TypeError, ValueError):  # long double, big-endian: no torch view of them
                return
        if isinstance(x, torch.Tensor):
            out[".".join(path) or "tensor"] = x
        elif isinstance(x, Mapping):
            for k, v in x.items():
                walk(v, (*path, str(k)))
        elif isinstance(x, list | tuple):
            for i, v in enumerate(x):
                walk(v, (*path, str(i)))

    walk(obj, ())
    return out


def describe(obj: Any) -> list[TensorInfo]:
    """List every tensor of a loaded structure by dotted path, marking storage shared with another."""
    out: list[TensorInfo] = []
    owners: dict[tuple[str, int], str] = {}
    optimizer = optimizer_tensor_paths(obj)
    for name, x in tensors_by_path(obj).items():
        storage = x.untyped_storage()
        # a meta tensor (a shard described, not read) has no data to share
        real = storage.nbytes() and x.device.type != "meta"
        ident = (str(x.device), storage.data_ptr()) if real else None
        owner = owners.get(ident) if ident else None
        if ident and owner is None:
            owners[ident] = name
        out.append(
            TensorInfo(
                name=name,
                dtype=dtype_name(x.dtype),
                shape=tuple(x.shape),
                nbytes=x.numel() * x.element_size(),
                shared_with=owner,
                optimizer_state=name in optimizer,
            )
        )
    return out
