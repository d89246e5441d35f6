"""The registry of readers: every reference torchkeep reads becomes one :class:`Source`.

Why one registry: ``load``, ``inspect``, ``load_into``, ``load_model``, ``verify``, ``diff``,
``scan`` and ``convert`` used to turn a reference into a path, a format and a reader each on
their own, and drifted apart (a verb that forgot the model directory, another the sharded
index). Now :func:`open_source` is the only dispatch (run reference, checkpoint directory, then
the file's format from its bytes), and :data:`READERS` the only place a format is named: a new
format is one :class:`Source` subclass and one entry there (a test checks that every
:class:`Format` has exactly one).

A source answers what the verbs need: ``load()`` the nested object (tensors mapped from the file
where the format allows, which is what lets ``load_into`` read them straight into parameters),
``info()`` for inspect, ``check()`` for verify (every problem, never raising for damage),
``scan()`` of its pickles. Runs are verified as a whole by the verify module itself.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, ClassVar

import torch

from torchkeep.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    TorchkeepError,
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
from torchkeep.format._detect import Format, detect, resolve_path
from torchkeep.format._directory import inspect_directory, is_checkpoint_dir
from torchkeep.format._info import CheckpointInfo, FileCheck
from torchkeep.format._location import MapLocation, cast, map_tensors
from torchkeep.format._pickle_scan import PickleScan, scan_file
from torchkeep.format._run import Manifest, RunReader, load_reference, parse_reference
from torchkeep.format._torchfile import load_torch, read_document
from torchkeep.format._values import plain_values


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
        obj, size = st.load(verify=False), self.path.stat().st_size
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
        return self._info(obj, metadata, version, self.path.stat().st_size)

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
            reader = open_path(shard, name)
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
        size = self.path.stat().st_size
        size += sum((self.path.parent / n).stat().st_size for n in set(weight_map.values()))
        return self._info(obj, metadata, None, size)

    def check(self, shown: str) -> FileCheck:
        return _checks.check_sharded(self.path, shown, check_file, lambda: self.load(verify=False))

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
        return open_path(resolve_path(weights), self.name).load(
            map_location=map_location, dtype=dtype, verify=verify
        )

    def info(self) -> CheckpointInfo:
        p = self.path
        inner = open_path(resolve_path(p / WEIGHTS_FILE), self.name).info()
        class_path, config = read_model_description(p)
        meta = {
            "class": class_path,
            "config": json.loads(json.dumps(config, default=str)),
            **inner.metadata,
        }
        return CheckpointInfo(
            path=str(p),
            format=self.format.value,
            tensors=inner.tensors,
            file_bytes=sum(f.stat().st_size for f in p.iterdir() if f.is_file()),
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


class RunSource(Source):
    """One checkpoint of a run (``RUN@latest``, ``RUN@best``, ``RUN@<step>``, ``RUN``)."""

    format = Format.RUN

    def load(
        self,
        *,
        map_location: MapLocation = None,
        dtype: torch.dtype | None = None,
        trust: bool = False,
        verify: bool = True,
    ) -> Any:
        return load_reference(
            self.name,
            lambda run, m: run.load(m, map_location=map_location, dtype=dtype, verify=verify),
        )

    def info(self) -> CheckpointInfo:
        info: CheckpointInfo = load_reference(self.name, _run_info)
        return info

    def check(self, shown: str) -> FileCheck:  # runs are verified whole, by the verify module
        raise NotImplementedError

    def scan(self) -> PickleScan:
        return scan_file(resolve_path(self.name))  # no pickles: as any other directory


class DirectorySource(Source):
    """A checkpoint directory (a Trainer ``checkpoint-N/``): described and checked file by file.

    Loading it loads the checkpoint file it holds under a usual name (``model.safetensors``...).
    """

    format = Format.CHECKPOINT_DIR

    def load(
        self,
        *,
        map_location: MapLocation = None,
        dtype: torch.dtype | None = None,
        trust: bool = False,
        verify: bool = True,
    ) -> Any:
        p = resolve_path(self.path)
        return open_path(p, self.name).load(
            map_location=map_location, dtype=dtype, trust=trust, verify=verify
        )

    def info(self) -> CheckpointInfo:
        return inspect_directory(self.path, lambda p: open_path(p, str(p)).info())

    def check(self, shown: str) -> FileCheck:  # directories are verified file by file
        raise NotImplementedError


#: The reader of each format: the one place a format is named.
READERS: dict[Format, type[Source]] = {
    Format.TORCHKEEP: SafetensorsSource,  # told from plain safetensors by its header
    Format.SAFETENSORS: SafetensorsSource,
    Format.TORCH_ZIP: TorchSource,
    Format.TORCH_LEGACY: LegacyTorchSource,
    Format.HF_SHARDED: ShardedSource,
    Format.MODEL_DIR: ModelDirSource,
    Format.TORCHSCRIPT: ExportedSource,
    Format.TORCH_EXPORT: TorchExportSource,
    Format.RUN: RunSource,
    Format.CHECKPOINT_DIR: DirectorySource,
}


def open_path(path: Path, name: str | None = None) -> Source:
    """The reader of the file (or model directory) at ``path``, by its bytes.

    Raises:
        CorruptCheckpointError: in no format torchkeep reads (or an ONNX model).
    """
    return READERS[detect(path)](path, os.fspath(path) if name is None else name)


def locate(ref: str | os.PathLike[str]) -> RunSource | DirectorySource | Path:
    """A run reference or a checkpoint directory as their source; anything else as a path.

    The path is the checkpoint file (or model directory) that :func:`open_path` reads: a
    directory holding one checkpoint (a ``save_model`` directory, a Hugging Face index,
    ``model.safetensors``...) is that checkpoint.

    Raises:
        CheckpointNotFoundError: nothing at ``ref``, or a directory with no checkpoint.
    """
    name = os.fspath(ref)
    if parse_reference(ref) is not None:
        return RunSource(Path(name), name)
    if is_checkpoint_dir(ref):
        return DirectorySource(Path(name), name)
    return resolve_path(ref)


def open_source(ref: str | os.PathLike[str]) -> Source:
    """The reader for a reference: a run reference, a checkpoint directory, or a file.

    Raises:
        CheckpointNotFoundError: nothing at ``ref``, or a directory with no checkpoint.
        CorruptCheckpointError: a file in no format torchkeep reads.
    """
    found = locate(ref)
    return found if isinstance(found, Source) else open_path(found, os.fspath(ref))


def check_file(p: Path, shown: str) -> FileCheck:
    """Verify one checkpoint file of any format (or a save_model directory), every problem."""
    try:
        source = open_path(p, shown)
    except TorchkeepError as exc:
        return _checks.damaged(shown, None, exc.message)
    except OSError as exc:
        return _checks.damaged(shown, None, f"cannot read the file: {exc}")
    return source.check(shown)


def load_file(
    path: str | os.PathLike[str],
    *,
    map_location: MapLocation = None,
    dtype: torch.dtype | None = None,
    trust: bool = False,
    verify: bool = True,
) -> Any:
    """Load any supported checkpoint (see :func:`open_source`) without running code from it."""
    return open_source(path).load(
        map_location=map_location, dtype=dtype, trust=trust, verify=verify
    )


def inspect_file(path: str | os.PathLike[str]) -> CheckpointInfo:
    """Describe a checkpoint without reading its tensor data (tensors are only mapped)."""
    return open_source(path).info()


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
        format=Format.RUN.value,
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
