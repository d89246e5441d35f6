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
``scan()`` of its pickles. Runs are verified as a whole by the verify module itself. The
readers of files are in ``_readers.py``; runs and checkpoint directories are read here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from torchkeep.errors import CorruptCheckpointError, TorchkeepError
from torchkeep.format import _checks
from torchkeep.format._dcp import DcpSource, is_dcp_dir
from torchkeep.format._describe import describe
from torchkeep.format._detect import Format, detect, resolve_path
from torchkeep.format._directory import inspect_directory, is_checkpoint_dir
from torchkeep.format._info import CheckpointInfo, FileCheck
from torchkeep.format._location import MapLocation
from torchkeep.format._pickle_files import PickleScan, scan_file
from torchkeep.format._readers import (
    ExportedSource,
    LegacyTorchSource,
    ModelDirSource,
    SafetensorsSource,
    ShardedSource,
    Source,
    TorchExportSource,
    TorchSource,
)
from torchkeep.format._registry import parse_registry_reference
from torchkeep.format._registry_source import RegistrySource
from torchkeep.format._run import Manifest, RunReader, load_reference, parse_reference
from torchkeep.format._sharded import assemble, meta_tensor
from torchkeep.format._values import plain_values
from torchkeep.storage import local_path, storage_for


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
            self.path,
            lambda run, m: run.load(m, map_location=map_location, dtype=dtype, verify=verify),
        )

    def info(self) -> CheckpointInfo:
        info: CheckpointInfo = load_reference(self.path, _run_info)
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
    Format.REGISTRY: RegistrySource,
    Format.DCP: DcpSource,
}


def open_path(path: Path, name: str | None = None) -> Source:
    """The reader of the file (or model directory) at ``path``, by its bytes.

    Raises:
        CorruptCheckpointError: in no format torchkeep reads (or an ONNX model).
    """
    return READERS[detect(path)](path, os.fspath(path) if name is None else name)


def locate(ref: str | os.PathLike[str]) -> Source | Path:
    """A run reference or a checkpoint directory as their source; anything else as a path.

    The path is the checkpoint file (or model directory) that :func:`open_path` reads: a
    directory holding one checkpoint (a ``save_model`` directory, a Hugging Face index,
    ``model.safetensors``...) is that checkpoint.

    Raises:
        CheckpointNotFoundError: nothing at ``ref``, or a directory with no checkpoint.
    """
    name = os.fspath(ref)
    if parse_reference(ref) is not None:
        return RunSource(local_path(ref), name)
    if parse_registry_reference(ref) is not None:
        return RegistrySource(Path(name), name)
    if is_dcp_dir(name):  # before checkpoint directories: its .metadata is a pickle
        return DcpSource(Path(name), name)
    if is_checkpoint_dir(ref):
        return DirectorySource(local_path(ref), name)
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


def _unread(ref: str) -> torch.Tensor:
    raise AssertionError(f"shard {ref!r} read while only described")


def _run_info(run: RunReader, manifest: Manifest) -> CheckpointInfo:
    obj = run.load(manifest, verify=False, shards=False)  # refuses missing packs first
    if manifest.sharded is not None and isinstance(obj, dict):
        # Shards described from their metadata (meta tensors), not assembled: no bytes read.
        obj.update(assemble(manifest.sharded, _unread, placeholder=meta_tensor))
    try:
        store = storage_for(run.root)
        sizes = {p: store.size(str(run.pack_path(p, manifest))) for p in manifest.packs}
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
        file_bytes=store.size(str(manifest.path)) + sum(sizes.values()),
        metadata={
            "step": manifest.step,
            "metrics": manifest.metrics,
            **models,
            **manifest.metadata,
        },
        format_version=str(run.description.get("format_version")),
    )
