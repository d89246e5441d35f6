"""``scan``: the globals a pickle-based checkpoint would import, listed without executing it.

A tripwire next to the real gate, torch's ``weights_only`` unpickler: a file (``.pt``, ``.bin``,
``.ckpt``...) or every checkpoint file of a directory (a Trainer ``checkpoint-N/``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchkeep.errors import TorchkeepError
from torchkeep.format import (
    DirectorySource,
    open_source,
)
from torchkeep.format._directory import PICKLE_FORMATS, entries
from torchkeep.format._pickle_files import PickleScan, scan_file
from torchkeep.storage._location import with_options


@dataclass(frozen=True, kw_only=True, slots=True)
class DirectoryScan:
    """What :func:`scan` found in a checkpoint directory: one :class:`PickleScan` per file.

    It answers like a :class:`PickleScan` (``globals``, ``unsafe``, ``is_safe``) for the
    directory as a whole, and names the files at fault.

    Attributes:
        path: the directory.
        files: the scan of every checkpoint file (safetensors files have no pickle records).
        damaged: ``(file, problem)`` for each checkpoint file that could not be parsed.
        skipped: files that are not checkpoints (JSON side files...), not scanned.
    """

    path: str
    files: tuple[PickleScan, ...]
    damaged: tuple[tuple[str, str], ...] = ()
    skipped: tuple[str, ...] = ()

    @property
    def records(self) -> tuple[str, ...]:
        return tuple(f"{Path(s.path).name}:{r}" for s in self.files for r in s.records)

    @property
    def globals(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(g for s in self.files for g in s.globals))

    @property
    def unsafe(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(g for s in self.files for g in s.unsafe))

    @property
    def unsafe_files(self) -> tuple[str, ...]:
        """The names of the files that would import a refused global."""
        return tuple(Path(s.path).name for s in self.files if not s.is_safe)

    @property
    def is_safe(self) -> bool:
        """No file imports a refused global, and every checkpoint file could be parsed."""
        return not self.unsafe and not self.damaged

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "is_safe": self.is_safe,
            "unsafe_files": list(self.unsafe_files),
            "damaged": [{"file": f, "problem": p} for f, p in self.damaged],
            "skipped": list(self.skipped),
            "globals": list(self.globals),
            "unsafe": list(self.unsafe),
            "files": [s.to_dict() for s in self.files],
        }


def _scan_directory(directory: Path) -> DirectoryScan:
    scans: list[PickleScan] = []
    damaged: list[tuple[str, str]] = []
    skipped: list[str] = []
    for e in entries(directory):
        if e.kind != "checkpoint":
            skipped.append(e.name)
        elif e.error is not None:
            damaged.append((e.name, e.error.message))
        elif e.format not in PICKLE_FORMATS:
            scans.append(PickleScan(path=str(e.path), records=(), globals=(), unsafe=()))
        else:
            try:
                scans.append(scan_file(e.path))
            except TorchkeepError as exc:
                damaged.append((e.name, exc.message))
    return DirectoryScan(
        path=str(directory), files=tuple(scans), damaged=tuple(damaged), skipped=tuple(skipped)
    )


def scan(
    path: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None
) -> PickleScan | DirectoryScan:
    """List the globals a pickle-based checkpoint would import, without executing anything.

    Safetensors files hold no pickle: their scan is empty and safe. A checkpoint directory (a
    Trainer ``checkpoint-N/``, Accelerate state) has every checkpoint file scanned: its
    :class:`DirectoryScan` is unsafe when any file is, and names them (``unsafe_files``).

    Raises:
        CheckpointNotFoundError, CorruptCheckpointError: nothing, or no checkpoint, at ``path``.
    """
    path = with_options(path, storage_options)
    source = open_source(path)
    if isinstance(source, DirectorySource):
        return _scan_directory(source.path)
    return source.scan()
