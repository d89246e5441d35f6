"""Checkpoint runs: saving, restoring, retention and garbage collection in one directory."""

from torchkeep.errors import RunLockedError
from torchkeep.manager._manager import CheckpointManager
from torchkeep.manager._records import CheckpointRecord, RestoreInfo
from torchkeep.manager._retention import PrunePlan, RetentionPolicy, select

__all__ = [
    "CheckpointManager",
    "CheckpointRecord",
    "PrunePlan",
    "RestoreInfo",
    "RetentionPolicy",
    "RunLockedError",
    "select",
]
