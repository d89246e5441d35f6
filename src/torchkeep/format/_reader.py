"""One entry point for every format torchkeep reads: load a file, or describe it."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchkeep.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
)
from torchkeep.format._artifact import SafetensorsFile, check_format_version
from torchkeep.format._detect import MODEL_FILE, Format, detect, resolve_path
from torchkeep.format._directory import inspect_directory, is_checkpoint_dir
from torchkeep.format._dtypes import dtype_name
from torchkeep.format._hash import seal_ok
from torchkeep.format._info import CheckpointInfo, TensorInfo
from torchkeep.format._location import MapLocation, cast, map_tensors
from torchkeep.format._run import Manifest, RunReader, load_reference, parse_reference
from torchkeep.format._safetensors import parse_json
from torchkeep.format._skeleton import unflatten
from torchkeep.format._torchfile import load_torch, read_document
from torchkeep.format._values import optimizer_tensor_paths, plain_values

WEIGHTS_FILE = "model.safetensors"


def _refuse_code_archive(path: Path, fmt: Format) -> UnsafeCheckpointError:
    if fmt is Format.TORCHSCRIPT:
        what = "a TorchScript archive"
        hint = "if you trust its origin, run it with torchkeep.load_exported(path, trust=True) or torch.jit.load"
    else:
        what = "a torch.export archive"
        hint = (
            "run it with torchkeep.load_exported(path), which refuses archives with pickles "
            "or compiled code"
        )
    return UnsafeCheckpointError(
        f"{what} holds a program, not a checkpoint; torchkeep.load does not run programs",
        path=str(path),
        hint=hint,
    )


def load_file(
    path: str | os.PathLike[str],
    *,
    map_location: MapLocation = None,
    dtype: torch.dtype | None = None,
    trust: bool = False,
    verify: bool = True,
) -> Any:
    """Load any supported checkpoint file (see :mod:`._detect`) without running code from it.

    ``path`` may also be a run reference (``RUN@latest``, ``RUN@best``, ``RUN@<step>``, ``RUN``),
    whose tensors are checked against their hashes unless ``verify=False``.
    """
    if parse_reference(path) is not None:
        return load_reference(
            path,
            lambda run, m: run.load(m, map_location=map_location, dtype=dtype, verify=verify),
        )
    p = resolve_path(path)
    fmt = detect(p)
    if fmt is Format.MODEL_DIR:
        return load_file(p / WEIGHTS_FILE, map_location=map_location, dtype=dtype, verify=verify)
    if fmt in (Format.SAFETENSORS, Format.TORCHKEEP):
        return SafetensorsFile(str(p)).load(map_location=map_location, dtype=dtype, verify=verify)
    if fmt in (Format.TORCH_ZIP, Format.TORCH_LEGACY):
        obj = load_torch(
            str(p),
            map_location=map_location,
            trust=trust,
            zip_format=fmt is Format.TORCH_ZIP,
            verify=verify,
        )
        return obj if dtype is None else map_tensors(obj, lambda t: cast(t, dtype))
    if fmt is Format.HF_SHARDED:
        return _load_sharded(p, map_location=map_location, dtype=dtype, trust=trust, verify=verify)
    raise _refuse_code_archive(p, fmt)


def _shard_files(index: Path) -> tuple[dict[str, str], dict[str, Any]]:
    doc = parse_json(index.read_bytes(), what="sharded index", path=str(index))
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


def _load_sharded(
    index: Path,
    *,
    map_location: MapLocation,
    dtype: torch.dtype | None,
    trust: bool,
    verify: bool = True,
) -> dict[str, torch.Tensor]:
    weight_map, _ = _shard_files(index)
    merged: dict[str, torch.Tensor] = OrderedDict()
    for name in dict.fromkeys(weight_map.values()):
        shard = index.parent / name
        if not shard.is_file():
            raise CheckpointNotFoundError(
                f"shard {name} listed in the index is missing",
                path=str(index),
                hint=f"download or copy {name} next to the index",
            )
        if detect(shard) not in (Format.SAFETENSORS, Format.TORCH_ZIP, Format.TORCH_LEGACY):
            raise CorruptCheckpointError(f"shard {name} is not a tensor file", path=str(shard))
        part = load_file(shard, map_location=map_location, dtype=dtype, trust=trust, verify=verify)
        if not isinstance(part, dict) or not all(
            isinstance(v, torch.Tensor) for v in part.values()
        ):
            raise CorruptCheckpointError(f"shard {name} is not a flat state dict", path=str(shard))
        merged.update(part)
    missing = [k for k, v in weight_map.items() if k not in merged]
    if missing:
        raise CorruptCheckpointError(
            f"{len(missing)} tensors listed in the index are not in their shards, e.g. {missing[0]!r}",
            path=str(index),
            key=missing[0],
        )
    return merged


def _run_info(run: RunReader, manifest: Manifest) -> CheckpointInfo:
    obj = run.load(manifest, verify=False)  # refuses missing packs first
    try:
        sizes = {p: run.pack_path(p, manifest).stat().st_size for p in manifest.packs}
    except OSError as exc:  # a pack that only an unused tensor entry names
        raise CorruptCheckpointError(
            f"a pack of the checkpoint is missing: {exc.filename}",
            path=str(manifest.path),
            hint="the run was damaged (a pack deleted by hand?); inspect another step",
        ) from exc
    classes = {key: m["class"] for key, m in manifest.models.items()}
    models = {"models": classes} if classes else {}  # what load_model can rebuild
    return CheckpointInfo(
        path=f"{run.root}@{manifest.step}",
        format="torchkeep-run",
        tensors=tuple(describe(obj)),
        values=plain_values(obj),
        file_bytes=manifest.path.stat().st_size + sum(sizes.values()),
        metadata={
            "step": manifest.step,
            "metrics": manifest.metrics,
            **models,
            **manifest.metadata,
        },
        format_version=str(run.description.get("format_version")),
    )


def _no_tensor(node: dict[str, Any]) -> torch.Tensor:
    raise CorruptCheckpointError("a model config must not refer to tensors")


def read_model_description(directory: Path) -> tuple[str, dict[str, Any]]:
    """The class path and constructor config recorded by ``save_model`` in ``directory``.

    The description ends with a digest of its own bytes (as a run's manifest does), so that any
    changed byte is detected, even one that leaves valid JSON (a digit of the config).
    """
    source = str(directory)
    data = (directory / MODEL_FILE).read_bytes()
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
        ident = (str(x.device), storage.data_ptr()) if storage.nbytes() else None
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


def inspect_file(path: str | os.PathLike[str]) -> CheckpointInfo:
    """Describe a checkpoint without reading its tensor data (tensors are only mapped).

    A directory that is not a run, a ``save_model`` directory or a sharded checkpoint (a
    Trainer ``checkpoint-N/``) is described file by file (``info.files``).
    """
    if parse_reference(path) is not None:
        info: CheckpointInfo = load_reference(path, _run_info)
        return info
    if is_checkpoint_dir(path):  # a Trainer checkpoint-N/, Accelerate state: every file
        return inspect_directory(Path(path), inspect_file)
    p = resolve_path(path)
    fmt = detect(p)
    version: str | None = None
    metadata: dict[str, Any] = {}
    size = p.stat().st_size
    if fmt is Format.MODEL_DIR:
        inner = inspect_file(p / WEIGHTS_FILE)
        class_path, config = read_model_description(p)
        meta = {
            "class": class_path,
            "config": json.loads(json.dumps(config, default=str)),
            **inner.metadata,
        }
        size = sum(f.stat().st_size for f in p.iterdir() if f.is_file())
        return CheckpointInfo(
            path=str(p),
            format=fmt.value,
            tensors=inner.tensors,
            file_bytes=size,
            metadata=meta,
            format_version=inner.format_version,
            values=inner.values,
        )
    if fmt in (Format.SAFETENSORS, Format.TORCHKEEP):
        st = SafetensorsFile(str(p))
        obj, metadata, version = st.load(verify=False), st.metadata, st.format_version
        fmt = Format(st.format)
    elif fmt in (Format.TORCH_ZIP, Format.TORCH_LEGACY):
        obj = load_torch(
            str(p), map_location="cpu", trust=False, zip_format=fmt is Format.TORCH_ZIP
        )
        doc = read_document(str(p)) if fmt is Format.TORCH_ZIP else None
        if doc is not None:
            metadata, version = dict(doc.get("metadata") or {}), str(doc["format_version"])
    elif fmt is Format.HF_SHARDED:
        weight_map, metadata = _shard_files(p)
        obj = _load_sharded(p, map_location="cpu", dtype=None, trust=False, verify=False)
        size += sum((p.parent / n).stat().st_size for n in set(weight_map.values()))
    else:
        raise _refuse_code_archive(p, fmt)
    return CheckpointInfo(
        path=str(p),
        format=fmt.value,
        tensors=tuple(describe(obj)),
        file_bytes=size,
        metadata=metadata,
        format_version=version,
        values=plain_values(obj),
    )
