"""The readers of single checkpoints (a file, or a ``save_model`` directory), one per format.

Each is registered in ``_sources.READERS``; this module holds :class:`Source`, the contract every
reader answers, and the readers of files. Readers of a sharded index and of a model directory
read their parts through the registry again (``_open``), so a shard is read as any file is.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any, ClassVar

import torch

from torchkeep.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
)
from torchkeep.format import _checks
from torchkeep.format._artifact import SafetensorsFile
from torchkeep.format._describe import (
    WEIGHTS_FILE,
    describe,
    read_model_description,
    shard_files,
)
from torchkeep.format._detect import Format, resolve_path
from torchkeep.format._info import CheckpointInfo, FileCheck
from torchkeep.format._location import MapLocation, cast, map_tensors
from torchkeep.format._pickle_files import PickleScan, scan_file
from torchkeep.format._torchfile import load_torch, read_document
from torchkeep.format._values import plain_values
from torchkeep.storage import storage_for


def _open(path: Path, name: str) -> Source:
    """The registry's reader for a part (a shard, a model directory's weights)."""
    from torchkeep.format._sources import open_path  # the registry imports this module

    return open_path(path, name)


def _check_part(path: Path, shown: str) -> FileCheck:
    """The registry's check of a part (a shard), every problem reported."""
    from torchkeep.format._sources import check_file  # the registry imports this module

    return check_file(path, shown)


def _empty_scan(path: Path) -> PickleScan:
    return PickleScan(path=str(path), records=(), globals=(), unsafe=())


class Source:
    """One checkpoint, opened by the reader of its format. Nothing is read until asked."""

    format: ClassVar[Format]

    def __init__(self, path: Path, name: str) -> None:
        self.path = path  # the file (or directory) the reader reads
        self.name = name  # the reference as the caller gave it, for messages

    def load(
        self,
        *,
        map_location: MapLocation = None,
        dtype: torch.dtype | None = None,
        trust: bool = False,
        verify: bool = True,
    ) -> Any:
        raise NotImplementedError

    def info(self) -> CheckpointInfo:
        raise NotImplementedError

    def check(self, shown: str) -> FileCheck:
        raise NotImplementedError

    def scan(self) -> PickleScan:
        return scan_file(self.path)

    def _info(
        self,
        obj: Any,
        metadata: dict[str, Any],
        version: str | None,
        size: int,
        fmt: str | None = None,
    ) -> CheckpointInfo:
        """The description of a loaded structure (``fmt``: when the header tells it apart)."""
        return CheckpointInfo(
            path=str(self.path),
            format=fmt or self.format.value,
            tensors=tuple(describe(obj)),
            file_bytes=size,
            metadata=metadata,
            format_version=version,
            values=plain_values(obj),
        )


class SafetensorsSource(Source):
    """A torchkeep or plain safetensors file, mapped once (header and tensors from one inode)."""

    format = Format.SAFETENSORS

    def load(
        self,
        *,
        map_location: MapLocation = None,
        dtype: torch.dtype | None = None,
        trust: bool = False,
        verify: bool = True,
    ) -> Any:
        st = SafetensorsFile(str(self.path))
        return st.load(map_location=map_location, dtype=dtype, verify=verify)

    def info(self) -> CheckpointInfo:
        st = SafetensorsFile(str(self.path))
        obj, size = st.load(verify=False), storage_for(self.path).size(str(self.path))
        return self._info(obj, st.metadata, st.format_version, size, Format(st.format).value)

    def check(self, shown: str) -> FileCheck:
        return _checks.check_safetensors(self.path, shown)

    def scan(self) -> PickleScan:
        return _empty_scan(self.path)


class TorchSource(Source):
    """A ``torch.save`` file, zip or legacy pickle: scanned, then ``torch.load(weights_only)``."""

    format = Format.TORCH_ZIP

    def load(
        self,
        *,
        map_location: MapLocation = None,
        dtype: torch.dtype | None = None,
        trust: bool = False,
        verify: bool = True,
    ) -> Any:
        obj = load_torch(
            str(self.path),
            map_location=map_location,
            trust=trust,
            zip_format=self.format is Format.TORCH_ZIP,
            verify=verify,
        )
        return obj if dtype is None else map_tensors(obj, lambda t: cast(t, dtype))

    def info(self) -> CheckpointInfo:
        p, is_zip = str(self.path), self.format is Format.TORCH_ZIP
        obj = load_torch(p, map_location="cpu", trust=False, zip_format=is_zip)
        doc = read_document(p) if is_zip else None
        metadata: dict[str, Any] = {}
        version = None
        if doc is not None:
            metadata, version = dict(doc.get("metadata") or {}), str(doc["format_version"])
        return self._info(obj, metadata, version, storage_for(self.path).size(str(self.path)))

    def check(self, shown: str) -> FileCheck:
        return _checks.check_torch(self.path, shown, self.format)


class LegacyTorchSource(TorchSource):
    format = Format.TORCH_LEGACY


class ShardedSource(Source):
    """A Hugging Face sharded checkpoint: the index, each shard read by its own reader."""

    format = Format.HF_SHARDED

    def load(
        self,
        *,
        map_location: MapLocation = None,
        dtype: torch.dtype | None = None,
        trust: bool = False,
        verify: bool = True,
    ) -> Any:
        index = self.path
        weight_map, _ = shard_files(index)
        merged: dict[str, torch.Tensor] = OrderedDict()
        for name in dict.fromkeys(weight_map.values()):
            shard = index.parent / name
            if not shard.is_file():
                raise CheckpointNotFoundError(
                    f"shard {name} listed in the index is missing",
                    path=str(index),
                    hint=f"download or copy {name} next to the index",
                )
            reader = _open(shard, name)
            if not isinstance(reader, SafetensorsSource | TorchSource):
                raise CorruptCheckpointError(f"shard {name} is not a tensor file", path=str(shard))
            part = reader.load(map_location=map_location, dtype=dtype, trust=trust, verify=verify)
            if not isinstance(part, dict) or not all(
                isinstance(v, torch.Tensor) for v in part.values()
            ):
                raise CorruptCheckpointError(
                    f"shard {name} is not a flat state dict", path=str(shard)
                )
            merged.update(part)
        missing = [k for k in weight_map if k not in merged]
        if missing:
            raise CorruptCheckpointError(
                f"{len(missing)} tensors listed in the index are not in their shards, "
                f"e.g. {missing[0]!r}",
                path=str(index),
                key=missing[0],
            )
        return merged

    def info(self) -> CheckpointInfo:
        weight_map, metadata = shard_files(self.path)
        obj = self.load(map_location="cpu", verify=False)
        size = storage_for(self.path).size(str(self.path))
        store = storage_for(self.path.parent)
        size += sum(store.size(str(self.path.parent / n)) for n in set(weight_map.values()))
        return self._info(obj, metadata, None, size)

    def check(self, shown: str) -> FileCheck:
        return _checks.check_sharded(self.path, shown, _check_part, lambda: self.load(verify=False))

    def scan(self) -> PickleScan:
        return _empty_scan(self.path)


class ModelDirSource(Source):
    """A ``save_model`` directory: ``model.safetensors`` plus the class and config to rebuild."""

    format = Format.MODEL_DIR

    def _weights(self) -> SafetensorsSource:
        return SafetensorsSource(self.path / WEIGHTS_FILE, self.name)

    def load(
        self,
        *,
        map_location: MapLocation = None,
        dtype: torch.dtype | None = None,
        trust: bool = False,
        verify: bool = True,
    ) -> Any:
        weights = self.path / WEIGHTS_FILE
        return _open(resolve_path(weights), self.name).load(
            map_location=map_location, dtype=dtype, verify=verify
        )

    def info(self) -> CheckpointInfo:
        p = self.path
        inner = _open(resolve_path(p / WEIGHTS_FILE), self.name).info()
        class_path, config = read_model_description(p)
        store = storage_for(p)
        meta = {
            "class": class_path,
            "config": json.loads(json.dumps(config, default=str)),
            **inner.metadata,
        }
        return CheckpointInfo(
            path=str(p),
            format=self.format.value,
            tensors=inner.tensors,
            file_bytes=sum(store.size(str(p / n)) for n in store.list(str(p)) if (p / n).is_file()),
            metadata=meta,
            format_version=inner.format_version,
            values=inner.values,
        )

    def check(self, shown: str) -> FileCheck:
        return self._weights().check(shown)


class ExportedSource(Source):
    """A TorchScript or ``torch.export`` archive: a program, not a checkpoint (refused)."""

    format = Format.TORCHSCRIPT

    def _refuse(self) -> UnsafeCheckpointError:
        if self.format is Format.TORCHSCRIPT:
            what = "a TorchScript archive"
            hint = (
                "if you trust its origin, run it with torchkeep.load_exported(path, trust=True) "
                "or torch.jit.load"
            )
        else:
            what = "a torch.export archive"
            hint = (
                "run it with torchkeep.load_exported(path), which refuses archives with pickles "
                "or compiled code"
            )
        return UnsafeCheckpointError(
            f"{what} holds a program, not a checkpoint; torchkeep.load does not run programs",
            path=str(self.path),
            hint=hint,
        )

    def load(
        self,
        *,
        map_location: MapLocation = None,
        dtype: torch.dtype | None = None,
        trust: bool = False,
        verify: bool = True,
    ) -> Any:
        raise self._refuse()

    def info(self) -> CheckpointInfo:
        raise self._refuse()

    def check(self, shown: str) -> FileCheck:
        return _checks.check_archive(self.path, shown, self.format)


class TorchExportSource(ExportedSource):
    format = Format.TORCH_EXPORT
