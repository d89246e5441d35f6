"""What a run reports: its checkpoints, and what a restore loaded."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torchkeep.format import Manifest


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckpointRecord:
    """One committed checkpoint of a run, as listed by ``CheckpointManager.checkpoints``.

    Attributes:
        step: the training step it was saved at.
        time: when it was committed (seconds since the epoch).
        metrics: the metrics saved with it.
        metadata: the user metadata saved with it.
        size: bytes of tensor data it holds (bytes shared with other checkpoints included).
        kept: why retention keeps it (``"latest"``, ``"best"``, ``"keep_last"``...).
        path: its manifest.
    """

    step: int
    time: float
    metrics: dict[str, Any]
    metadata: dict[str, Any]
    size: int
    kept: tuple[str, ...]
    path: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "time": self.time,
            "metrics": self.metrics,
            "metadata": self.metadata,
            "size": self.size,
            "kept": list(self.kept),
            "path": self.path,
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class RestoreInfo:
    """What ``CheckpointManager.restore`` loaded.

    Attributes:
        step: the step of the restored checkpoint.
        metrics: its metrics.
        metadata: its user metadata.
        values: the plain (non-stateful) values of the app state, e.g. ``{"epoch": 3}``.
        path: the manifest read.
    """

    step: int
    metrics: dict[str, Any]
    metadata: dict[str, Any]
    values: dict[str, Any] = field(default_factory=dict)
    path: str = ""

    def __getitem__(self, name: str) -> Any:
        """A plain value of the restored app state: ``info["epoch"]``."""
        return self.values[name]

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "metrics": self.metrics,
            "metadata": self.metadata,
            "values": {k: v for k, v in self.values.items() if isinstance(v, int | float | str)},
            "path": self.path,
        }


def record_of(manifest: Manifest, kept: tuple[str, ...]) -> CheckpointRecord:
    """The record of a committed manifest, with why retention keeps it."""
    return CheckpointRecord(
        step=manifest.step,
        time=manifest.time,
        metrics=manifest.metrics,
        metadata=manifest.metadata,
        size=manifest.nbytes,
        kept=kept,
        path=str(manifest.path),
    )


def restore_info(manifest: Manifest, values: dict[str, Any]) -> RestoreInfo:
    """What a restore of ``manifest`` loaded (``values``: the plain values written back)."""
    return RestoreInfo(
        step=manifest.step,
        metrics=manifest.metrics,
        metadata=manifest.metadata,
        values=values,
        path=str(manifest.path),
    )
