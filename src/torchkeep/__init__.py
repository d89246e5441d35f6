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
    CleanupWarning,
    CorruptCheckpointError,
    ExportError,
    ExportVerificationError,
    FormatVersionError,
    IncompatibleStateError,
    ModelClassError,
    StorageError,
    TorchkeepError,
    TorchkeepWarning,
    UnsafeCheckpointError,
    UnsupportedValueError,
)
from torchkeep.export import ExportReport, OutputCheck, export, load_exported
from torchkeep.format import CheckpointInfo, TensorInfo
from torchkeep.io import convert, inspect, load, load_into, load_model, save, save_model
from torchkeep.manager import CheckpointManager, CheckpointRecord, RestoreInfo, RunLockedError
from torchkeep.state import (
    ConfigMixin,
    LoadReport,
    Mismatch,
    RNGState,
    capture_config,
    freeze,
    trainable_param_groups,
    unfreeze,
)
from torchkeep.verify import PickleScan, VerifyReport, scan, verify

__all__ = [
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointRecord",
    "CleanupWarning",
    "ConfigMixin",
    "CorruptCheckpointError",
    "DiffReport",
    "ExportError",
    "ExportReport",
    "ExportVerificationError",
    "FormatVersionError",
    "IncompatibleStateError",
    "LoadReport",
    "Mismatch",
    "ModelClassError",
    "OutputCheck",
    "PickleScan",
    "RNGState",
    "RestoreInfo",
    "RunLockedError",
    "StorageError",
    "TensorDiff",
    "TensorInfo",
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
