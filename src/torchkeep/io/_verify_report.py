"""What ``verify`` reports: one :class:`VerifyReport` for a file, a directory, a run checkpoint or a run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torchkeep.format import (
    FileCheck,
)


@dataclass(frozen=True, kw_only=True, slots=True)
class VerifyReport:
    """The outcome of :func:`verify`.

    Attributes:
        target: what was checked.
        kind: ``"run"``, ``"checkpoint"`` (one of a run), ``"file"`` or ``"directory"`` (a
            checkpoint directory such as a Trainer ``checkpoint-N/``).
        checkpoints: how many checkpoints (checkpoint files, for a directory) were checked.
        tensors: how many tensors were read and checked.
        problems: every problem found, one line each (empty when all is well).
        notes: observations that are not problems (e.g. packs left by a crashed save).
        hashed: tensors whose bytes matched a stored hash or checksum.
        structural: tensors checked for structure only (their format stores no checksum).
        damaged: tensors whose bytes failed their check.
        files: what was checked in each file (files and directories; empty for runs).
    """

    target: str
    kind: str
    checkpoints: int
    tensors: int
    problems: tuple[str, ...]
    notes: tuple[str, ...] = ()
    hashed: int = 0
    structural: int = 0
    damaged: int = 0
    files: tuple[FileCheck, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "kind": self.kind,
            "ok": self.ok,
            "checkpoints": self.checkpoints,
            "tensors": self.tensors,
            "hashed": self.hashed,
            "structural": self.structural,
            "damaged": self.damaged,
            "problems": list(self.problems),
            "notes": list(self.notes),
            "files": [f.to_dict() for f in self.files],
        }
