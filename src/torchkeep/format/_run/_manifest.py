"""The run's JSON documents, written and read in one place: the manifest and the run description.

A manifest is what commits a checkpoint (see this package's ``__init__``): the JSON skeleton of
the saved state, a table of its tensors as (pack, key, dtype, shape, nbytes, hash), the size and
hash of each pack it uses, its metrics, metadata and the ``system`` that wrote it, and, under
``"models"``, how to rebuild each model of the app. It ends with a digest of its own bytes
(``seal_json``), so that any changed byte is detected, even one that leaves valid JSON.

The writer (``manager/_writer.py``) decides when these bytes are written, and in which order
with the packs; this module decides what they are. Keeping :func:`encode_manifest` beside
:func:`read_manifest` means a field is added to both or to neither.
"""

from __future__ import annotations

import datetime
import json
import math
import platform
import re
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from torchkeep.errors import CorruptCheckpointError
from torchkeep.format._artifact import check_format_version, metadata_json
from torchkeep.format._dtypes import shape_numel, tensor_dtype_from_name
from torchkeep.format._hash import seal_json, seal_ok
from torchkeep.format._json import JSON_LIMIT, parse_json
from torchkeep.format._run._layout import RUN_FILE
from torchkeep.format._sharded import check_sharded
from torchkeep.format._versions import FORMAT_VERSION, version_block
from torchkeep.storage import storage_for

RUN_KIND = "torchkeep-run"
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True, kw_only=True, slots=True)
class TensorRef:
    """Where one tensor of a checkpoint is stored."""

    pack: str
    key: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    hash: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Manifest:
    """A committed checkpoint: what it holds and where its tensors are."""

    path: Path
    step: int
    time: float
    metrics: dict[str, Any]
    metadata: dict[str, Any]
    skeleton: Any
    tensors: dict[str, TensorRef]
    pack_digests: dict[str, tuple[int, str]] = field(default_factory=dict)
    models: dict[str, Any] = field(default_factory=dict)
    """``{app_key: {"class": "pkg.mod:Name", "config": skeleton}}`` for each rebuildable model."""
    sharded: dict[str, Any] | None = None
    """DCP's metadata as JSON, for a checkpoint saved in shards (``format/_sharded.py``)."""
    identity: tuple[int, int] | None = None
    """``(st_dev, st_ino)`` of the manifest file read, to tell later whether it is still there."""

    @property
    def packs(self) -> set[str]:
        return {t.pack for t in self.tensors.values()}

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data this checkpoint refers to (shared bytes counted)."""
        return sum(t.nbytes for t in self.tensors.values())


# -- writing ----------------------------------------------------------------------------------


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
        **version_block(with_format=False),
        "git_commit": commit,
    }


def encode_manifest(manifest: Manifest, *, system: Mapping[str, Any]) -> bytes:
    """The sealed bytes of ``manifest`` (its ``time`` the commit's, ``system`` from
    :func:`system_info`): what :func:`read_manifest` reads back as the same manifest."""
    created = datetime.datetime.fromtimestamp(manifest.time, datetime.UTC)
    document: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "step": manifest.step,
        "time": manifest.time,
        "metrics": manifest.metrics,
        "metadata": manifest.metadata,
        "system": {"created": created.isoformat(), **system},
        "skeleton": manifest.skeleton,
        "tensors": {k: _tensor_fields(r) for k, r in manifest.tensors.items()},
        "packs": {
            name: {"bytes": n, "hash": h} for name, (n, h) in sorted(manifest.pack_digests.items())
        },
    }
    if manifest.models:
        document["models"] = manifest.models
    if manifest.sharded is not None:
        document["sharded"] = manifest.sharded
    return seal_json(json.dumps(document, separators=(",", ":")).encode())


def _tensor_fields(ref: TensorRef) -> dict[str, Any]:
    return {
        "pack": ref.pack,
        "key": ref.key,
        "dtype": ref.dtype,
        "shape": list(ref.shape),
        "nbytes": ref.nbytes,
        "hash": ref.hash,
    }


def encode_run_file(policy: Mapping[str, Any], history: list[dict[str, Any]]) -> bytes:
    """The bytes of ``torchkeep_run.json``: the retention policy and how it changed."""
    document: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "kind": RUN_KIND,
        "torchkeep_version": version_block()["torchkeep_version"],
        "policy": dict(policy),
    }
    if history:
        document["policy_history"] = history
    return json.dumps(document, indent=2).encode()


# -- reading ----------------------------------------------------------------------------------


def read_run_file(root: Path) -> dict[str, Any]:
    """The run description of the run at ``root``, its format version checked."""
    with storage_for(root).open_read(str(root / RUN_FILE)) as f:
        data = f.read()
    doc = parse_json(data, what="run description", path=str(root))
    if not isinstance(doc, dict):
        raise CorruptCheckpointError(f"{RUN_FILE} is not a JSON object", path=str(root))
    check_format_version(doc.get("format_version"), path=str(root / RUN_FILE))
    return doc


def bad_manifest(path: Path, what: str, key: str | None = None) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"invalid manifest: {what}",
        path=str(path),
        key=key,
        hint="the manifest was altered or written by an incompatible tool; "
        "delete it to drop this checkpoint, or restore it from a copy",
    )


def read_manifest(path: Path) -> Manifest:
    """Parse and validate a manifest; pack names may not point outside the run.

    A manifest ends with a digest of its own bytes, so that any changed byte is detected, even
    one that leaves valid JSON (a digit of a metric, a pack name).
    """
    _bad = bad_manifest
    store = storage_for(path)
    size = store.size(str(path))
    if size > JSON_LIMIT:  # refused before it is read into memory
        raise _bad(path, f"{size} bytes, over the {JSON_LIMIT}-byte limit")
    with store.open_read(str(path)) as f:  # raw OSError: a pruned manifest stays FileNotFoundError
        data = f.read()
    doc = parse_json(data, what="manifest", path=str(path))
    if not isinstance(doc, dict):
        raise _bad(path, "not a JSON object")
    check_format_version(doc.get("format_version"), path=str(path))
    if not seal_ok(data):
        raise _bad(path, "its bytes do not match its digest (altered or damaged)")
    step, tensors = doc.get("step"), doc.get("tensors")
    if type(step) is not int or step < 0:
        raise _bad(path, f"step {step!r} is not a non-negative integer")
    if not isinstance(tensors, dict) or "skeleton" not in doc:
        raise _bad(path, "no tensor table or skeleton")
    metrics, metadata = doc.get("metrics", {}), doc.get("metadata", {})
    if not isinstance(metrics, dict) or not isinstance(metadata, dict):
        raise _bad(path, "metrics and metadata must be objects")
    refs = {key: _tensor_ref(path, key, ref) for key, ref in tensors.items()}
    time = doc.get("time", 0.0)
    if type(time) not in (int, float) or not math.isfinite(as_float(time)):
        raise _bad(path, f"time {str(time)[:40]} is not a number")
    return Manifest(
        path=path,
        step=step,
        time=float(time),
        metrics=metrics,
        metadata=metadata,
        skeleton=doc["skeleton"],
        tensors=refs,
        pack_digests=_pack_digests(doc.get("packs", {}), path),
        models=_models(doc.get("models", {}), path),
        sharded=None if "sharded" not in doc else check_sharded(doc["sharded"], refs, str(path)),
    )


def _tensor_ref(path: Path, key: str, ref: Any) -> TensorRef:
    """One entry of the tensor table, checked: its pack a plain name inside the run, its shape
    and dtype agreeing with its byte count."""
    try:
        pack, shape, nbytes = ref["pack"], tuple(ref["shape"]), ref["nbytes"]
        if not _is_count(nbytes):
            raise ValueError(f"nbytes {str(nbytes)[:40]} is not a byte count")
        dtype = tensor_dtype_from_name(ref["dtype"], path=str(path), key=str(key))
        item = TensorRef(
            pack=pack,
            key=str(ref["key"]),
            dtype=ref["dtype"],
            shape=shape,
            nbytes=nbytes,
            hash=str(ref["hash"]),
        )
    except CorruptCheckpointError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise bad_manifest(path, f"tensor entry {key!r} is malformed ({exc})", key) from exc
    if not (isinstance(pack, str) and _PLAIN_NAME.match(pack) and len(pack) <= 200) or (
        Path(pack).name != pack
    ):  # a name beyond 255 bytes makes every filesystem call raise OSError
        raise bad_manifest(path, f"tensor {key!r} names pack {pack!r} outside the run", key)
    numel = shape_numel(shape)
    if numel is None or numel * dtype.itemsize != item.nbytes:
        raise bad_manifest(path, f"tensor {key!r}: shape and dtype disagree with nbytes", key)
    return item


def _models(models: Any, path: Path) -> dict[str, Any]:
    """The model descriptions: each an object naming its class (the config is checked on use)."""
    if not isinstance(models, dict):
        raise bad_manifest(path, "models must be an object")
    for key, description in models.items():
        if not (isinstance(description, dict) and isinstance(description.get("class"), str)):
            raise bad_manifest(path, f"model entry {key!r} names no class", key)
    return models


def _pack_digests(packs: Any, path: Path) -> dict[str, tuple[int, str]]:
    """The size and whole-file hash of each pack, as the manifest records them."""
    if not isinstance(packs, dict):
        raise bad_manifest(path, "packs must be an object")
    out: dict[str, tuple[int, str]] = {}
    for name, info in packs.items():
        if not (
            isinstance(info, dict)
            and _is_count(info.get("bytes"))
            and isinstance(info.get("hash"), str)
        ):
            raise bad_manifest(path, f"pack entry {name!r} is malformed")
        out[name] = (info["bytes"], info["hash"])
    return out


def _is_count(x: Any) -> bool:
    return type(x) is int and x >= 0


def as_float(x: int | float) -> float:
    """``float(x)``, or NaN for an int beyond a float's range (a crafted 400-digit metric)."""
    try:
        return float(x)
    except OverflowError:
        return math.nan


__all__ = [
    "Manifest",
    "TensorRef",
    "as_float",
    "bad_manifest",
    "clean_metrics",
    "encode_manifest",
    "encode_run_file",
    "read_manifest",
    "read_run_file",
    "system_info",
]
