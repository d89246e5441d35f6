"""torchkeep: safe, exact and fast checkpoints for PyTorch.

Example:
    >>> import torchkeep as tk
    >>> tk.save({"epoch": 3, "model_state_dict": model.state_dict()}, "ckpt.safetensors")
    >>> report = tk.load_into(model, "ckpt.safetensors")
"""

from torchkeep._version import __version__
from torchkeep.diff import DiffReport, TensorDiff, diff
from torchkeep.errors import (
    CheckpointNotFoundError,
    CheckpointPrunedError,
    CleanupWarning,
    CorruptCheckpointError,
    ExportError,
    ExportVerificationError,
    FormatVersionError,
    IncompatibleStateError,
    InvalidArgumentError,
    ModelClassError,
    RunLockedError,
    StorageError,
    TorchkeepError,
    TorchkeepWarning,
    UnsafeCheckpointError,
    UnsupportedValueError,
)
from torchkeep.export import ExportReport, OutputCheck, export, load_exported
from torchkeep.format import CheckpointInfo, FileInfo, TensorInfo
from torchkeep.io import convert, inspect, load, load_into, load_model, save, save_model
from torchkeep.manager import (
    CheckpointManager,
    CheckpointRecord,
    PrunePlan,
    RestoreInfo,
    RetentionPolicy,
)
from torchkeep.state import (
    ConfigMixin,
    LoadReport,
    Mismatch,
    RNGState,
    Tie,
    capture_config,
    freeze,
    trainable_param_groups,
    unfreeze,
)
from torchkeep.verify import DirectoryScan, FileCheck, PickleScan, VerifyReport, scan, verify

__all__ = [
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointPrunedError",
    "CheckpointRecord",
    "CleanupWarning",
    "ConfigMixin",
    "CorruptCheckpointError",
    "DiffReport",
    "DirectoryScan",
    "ExportError",
    "ExportReport",
    "ExportVerificationError",
    "FileCheck",
    "FileInfo",
    "FormatVersionError",
    "IncompatibleStateError",
    "InvalidArgumentError",
    "LoadReport",
    "Mismatch",
    "ModelClassError",
    "OutputCheck",
    "PickleScan",
    "PrunePlan",
    "RNGState",
    "RestoreInfo",
    "RetentionPolicy",
    "RunLockedError",
    "StorageError",
    "TensorDiff",
    "TensorInfo",
    "Tie",
    "TorchkeepError",
    "TorchkeepWarning",
    "UnsafeCheckpointError",
    "UnsupportedValueError",
    "VerifyReport",
    "__version__",
    "capture_config",
    "convert",
    "diff",
    "export",
    "freeze",
    "inspect",
    "load",
    "load_exported",
    "load_into",
    "load_model",
    "save",
    "save_model",
    "scan",
    "trainable_param_groups",
    "unfreeze",
    "verify",
]
