"""The exceptions torchkeep raises.

Every error torchkeep raises is a :class:`TorchkeepError`. Children also inherit the builtin
exception a caller would naturally catch, so ``except FileNotFoundError`` keeps working::

    TorchkeepError
    ├── CheckpointNotFoundError     (also FileNotFoundError)  nothing at that path or reference
    │   └── CheckpointPrunedError                              deleted by retention while being read
    ├── CorruptCheckpointError      (also ValueError)         bytes that are not what they claim
    │   └── FormatVersionError                                 written by a newer torchkeep
    ├── UnsafeCheckpointError                                  loading would run code from the file
    ├── IncompatibleStateError      (also ValueError)         a state that does not fit its target
    ├── InvalidArgumentError        (also ValueError)         an argument torchkeep cannot act on
    ├── UnsupportedValueError       (also TypeError)          a value torchkeep cannot store safely
    ├── ModelClassError             (also ImportError)        a saved model's class cannot be rebuilt
    ├── StorageError                (also OSError)            the disk or filesystem failed
    ├── RunLockedError                                         another process writes to the run
    ├── DistributedError                                       a rank of the job failed or did not arrive
    ├── SnapshotChangedError                                   a tensor changed while an async save copied it
    └── ExportError                                            an exporter could not convert the model
        └── ExportVerificationError (also ValueError)         the export computes something else

Each message says what failed, where (path, key), why, and the way out. The same facts are
attributes (``path``, ``key``, ``expected``, ``actual``, ``hint``) for programs.

Warnings (``UserWarning`` subclasses, for what failed without losing anything)::

    TorchkeepWarning
    └── CleanupWarning       a committed save's housekeeping (history, retention, GC) failed;
                             the checkpoint is saved, and the next save retries
"""

from __future__ import annotations

import re
from typing import Any

__all__ = [
    "CheckpointNotFoundError",
    "CheckpointPrunedError",
    "CleanupWarning",
    "CorruptCheckpointError",
    "DistributedError",
    "ExportError",
    "ExportVerificationError",
    "FormatVersionError",
    "IncompatibleStateError",
    "InvalidArgumentError",
    "ModelClassError",
    "RegistryError",
    "RunLockedError",
    "SnapshotChangedError",
    "StorageError",
    "TorchkeepError",
    "TorchkeepWarning",
    "UnsafeCheckpointError",
    "UnsupportedValueError",
]

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def strip_ansi(text: str) -> str:
    """Remove terminal colour codes that wrapped errors (torch's exporters) carry."""
    return _ANSI.sub("", text)


class TorchkeepError(Exception):
    """Base class of every error torchkeep raises.

    Args:
        message: what failed and why.
        path: the file or reference involved, when there is one.
        key: the tensor or entry involved, when there is one.
        expected: what torchkeep expected to find.
        actual: what it found.
        hint: the way out, shown on its own line (defaults to the class's ``default_hint``).
    """

    default_hint: str | None = None

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        key: str | None = None,
        expected: Any = None,
        actual: Any = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(strip_ansi(message))
        self.message = strip_ansi(message)
        self.path = None if path is None else str(path)
        self.key = key
        self.expected = expected
        self.actual = actual
        self.hint = hint if hint is not None else self.default_hint

    def __str__(self) -> str:
        text = self.message
        if self.path is not None and self.path not in text:
            text = f"{self.path}: {text}"
        if self.hint:
            text = f"{text}\n  hint: {self.hint}"
        return text


class CheckpointNotFoundError(TorchkeepError, FileNotFoundError):
    """Nothing readable exists at the given path or reference."""

    default_hint = "check the path"


class CheckpointPrunedError(CheckpointNotFoundError):
    """The checkpoint was deleted by the run's retention (a writer at work) while being read.

    Not damage: the writer deletes a checkpoint's manifest before the packs only it used, and a
    reader that finds a pack gone checks that its manifest is gone too before saying this.
    """

    default_hint = "read the run again (RUN@latest), or keep more checkpoints (keep_last)"


class CorruptCheckpointError(TorchkeepError, ValueError):
    """The bytes are damaged, truncated, or do not match any format torchkeep reads."""

    default_hint = "the file is damaged, truncated or was altered; restore it from a copy"


class FormatVersionError(CorruptCheckpointError):
    """The file was written by a newer, incompatible version of the torchkeep format."""


class UnsafeCheckpointError(TorchkeepError):
    """Loading the file would import or call code that torch's safe unpickler does not allow.

    ``globals`` lists the ``module.name`` references the file asks for.
    """

    def __init__(self, message: str, *, globals: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.globals = list(globals or [])


class IncompatibleStateError(TorchkeepError, ValueError):
    """A state does not fit the object it is loaded into (missing, unexpected or misshaped keys).

    ``report`` holds the :class:`~torchkeep.LoadReport` when there is one.
    """

    def __init__(self, message: str, *, report: Any = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.report = report


class InvalidArgumentError(TorchkeepError, ValueError):
    """An argument has a value torchkeep cannot act on (``keep_last=0``, ``mode="avg"``...).

    Raised before anything is read or written; the message names the argument and the values
    it accepts.
    """


class UnsupportedValueError(TorchkeepError, TypeError):
    """A value cannot be stored without pickling code (an arbitrary object, a sparse tensor...)."""


class ModelClassError(TorchkeepError, ImportError):
    """The class of a saved model cannot be imported or constructed."""


class StorageError(TorchkeepError, OSError):
    """Reading or writing bytes failed (disk full, permission denied, I/O error).

    ``committed`` is True when a file was renamed into place (so readers see it) but could not
    be made durable afterwards (the fsync of its directory failed).
    """

    committed: bool = False


class RegistryError(TorchkeepError):
    """A model registry refuses a change: a version that exists, one an alias points to."""


class RunLockedError(TorchkeepError):
    """Another process is writing to this run."""

    default_hint = (
        "stop the other writer first, or open the run read-only "
        "(CheckpointManager(path, read_only=True)) to list and load checkpoints"
    )


class DistributedError(TorchkeepError):
    """The ranks of a distributed job did not meet: one did not arrive in time, or failed."""

    default_hint = "nothing was committed for this step; check the named rank's log"


class SnapshotChangedError(TorchkeepError):
    """An overlapped async save found a tensor changed in place before it was copied to host
    memory (``key`` names it; ``expected``/``actual`` are its versions): the save is not
    committed, since its checkpoint would not hold the state at ``save()``."""


class ExportError(TorchkeepError):
    """An exporter (ONNX, torch.export, TorchScript) could not convert the model.

    ``module`` names the submodule where it failed (``"encoder.layers.0.attn"``, with its class)
    when the failure could be traced to one; ``step`` names the exporter's step.
    """

    def __init__(
        self, message: str, *, module: str | None = None, step: str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(message, **kwargs)
        self.module = module
        self.step = step


class ExportVerificationError(ExportError, ValueError):
    """The exported artifact's outputs differ from the eager model's beyond tolerance.

    ``report`` holds the :class:`~torchkeep.ExportReport` with every number; nothing was
    written at the destination.
    """

    def __init__(self, message: str, *, report: Any = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.report = report


class TorchkeepWarning(UserWarning):
    """Base class of the warnings torchkeep emits."""


class CleanupWarning(TorchkeepWarning):
    """Work after a checkpoint's commit point failed (metrics history, retention, deleting
    unused packs, the directory fsync); the checkpoint itself is saved. The manager retries at
    the next save; ``path`` names what could not be written or deleted."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path
