"""What `torchkeep.inspect` and `torchkeep.verify` report about a file: format, tensors, checks."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True, kw_only=True, slots=True)
class TensorInfo:
    """One tensor of a checkpoint as listed by ``inspect``.

    Attributes:
        name: the key (dotted path for nested checkpoints, e.g. ``model_state_dict.fc.weight``).
        dtype: torch dtype name without the ``torch.`` prefix (``"float32"``).
        shape: the tensor's shape.
        nbytes: bytes of tensor data (``numel * itemsize``).
        shared_with: the name of the tensor this one shares storage with (a tied weight or a
            view), or ``None`` when it owns its bytes.
        optimizer_state: the tensor is part of an optimizer's state (Adam's ``exp_avg``,
            ``exp_avg_sq``, ``step``), not of the model.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    shared_with: str | None = None
    optimizer_state: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckpointInfo:
    """What a checkpoint file holds, read without loading its tensors.

    Attributes:
        path: the file or directory inspected.
        format: the format detected from the bytes (``"torchkeep"``, ``"safetensors"``,
            ``"torch-zip"``, ``"torch-legacy"``, ``"hf-sharded"``, ``"torchkeep-model"``).
        tensors: every tensor, in file order.
        file_bytes: size of the file(s) on disk.
        metadata: user metadata saved with the checkpoint (empty when there is none).
        format_version: torchkeep format version, when the file is a torchkeep file.
        values: the plain values saved in the checkpoint beside its tensors, by dotted path,
            down to two keys deep (``epoch``, ``loss``, ``hyper_parameters.lr``).
        files: for a checkpoint directory (format ``"checkpoint-dir"``), every file in it; its
            ``tensors`` are then those of all its files, named ``<file>/<tensor>``.
    """

    path: str
    format: str
    tensors: tuple[TensorInfo, ...]
    file_bytes: int
    metadata: dict[str, Any] = field(default_factory=dict)
    format_version: str | None = None
    values: dict[str, Any] = field(default_factory=dict)
    files: tuple[FileInfo, ...] = ()

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data, counting shared storage once."""
        return sum(t.nbytes for t in self.tensors if t.shared_with is None)

    @property
    def num_params(self) -> int:
        """Number of model parameters: elements of the floating-point (and complex) tensors,
        shared storage counted once.

        Optimizer state (``exp_avg``, ``exp_avg_sq``, ``step``) is not counted, nor are integer
        and bool tensors: step counters, ``num_batches_tracked``, RNG states, token ids.
        """
        total = 0
        for t in self.tensors:
            if (
                t.shared_with is None
                and not t.optimizer_state
                and t.dtype.startswith(("float", "bfloat", "complex"))
            ):
                n = 1
                for s in t.shape:
                    n *= s
                total += n
        return total

    @property
    def shared(self) -> dict[str, str]:
        """Map of tensor name to the name whose storage it shares."""
        return {t.name: t.shared_with for t in self.tensors if t.shared_with is not None}

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "format_version": self.format_version,
            "file_bytes": self.file_bytes,
            "total_bytes": self.total_bytes,
            "num_tensors": len(self.tensors),
            "num_params": self.num_params,
            "tensors": [t.to_dict() for t in self.tensors],
            "shared": self.shared,
            "metadata": self.metadata,
            "values": self.values,
            **({"files": [f.to_dict() for f in self.files]} if self.files else {}),
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class FileInfo:
    """One file of a checkpoint directory (a Trainer ``checkpoint-N/``, Accelerate state...).

    Attributes:
        name: the file's name inside the directory.
        kind: ``"checkpoint"`` (a tensor or pickle file), ``"side-file"`` (JSON beside the
            checkpoint files, e.g. ``trainer_state.json``), ``"other"`` (not a checkpoint) or
            ``"directory"`` (a subdirectory, not looked into).
        format: the format detected from the bytes (as in :class:`CheckpointInfo`), ``"json"``
            for side files, ``None`` when unknown.
        file_bytes: size on disk.
        tensors: how many tensors the file holds (0 when it was not read).
        tensor_bytes: bytes of tensor data, shared storage counted once.
        summary: one line on what the file holds.
        problem: why the file could not be described (damaged, or unsafe to load), else ``None``.
    """

    name: str
    kind: str
    format: str | None
    file_bytes: int
    tensors: int = 0
    tensor_bytes: int = 0
    summary: str = ""
    problem: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: How a file's tensor bytes were checked: against xxh3-128 hashes torchkeep recorded, against
#: the CRC-32 a zip archive records for every member, or not at all (structure only).
CHECKS = ("xxh3_128", "crc32", None)


@dataclass(frozen=True, kw_only=True, slots=True)
class FileCheck:
    """What :func:`verify` checked in one file.

    Attributes:
        path: the file (its name, inside a checkpoint directory).
        format: the format detected from its bytes; ``"json"`` for a side file.
        status: ``"ok"``, ``"damaged"``, ``"unsafe"`` (a pickle torchkeep will not load),
            ``"side-file"`` (JSON beside the checkpoint, parsed) or ``"skipped"`` (not a
            checkpoint: listed, not checked).
        check: how tensor bytes were checked: ``"xxh3_128"`` (hashes torchkeep recorded),
            ``"crc32"`` (the zip's checksums of a torch file from elsewhere) or ``None``.
        tensors: stored tensors read.
        hashed: tensors whose bytes matched a stored hash (or CRC-32, see ``check``).
        structural: tensors checked for structure only (dtype, shape, bounds): the format stores
            no checksum for them (plain safetensors, legacy torch files).
        damaged: tensors (or, for ``crc32``, storage members) whose bytes failed their check.
        problems: every problem found in the file.
    """

    path: str
    format: str | None
    status: str
    check: str | None = None
    tensors: int = 0
    hashed: int = 0
    structural: int = 0
    damaged: int = 0
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "side-file", "skipped")

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "status": self.status,
            "ok": self.ok,
            "check": self.check,
            "tensors": self.tensors,
            "hashed": self.hashed,
            "structural": self.structural,
            "damaged": self.damaged,
            "problems": list(self.problems),
        }
