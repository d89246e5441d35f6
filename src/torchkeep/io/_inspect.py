"""``inspect``: describe a checkpoint (format, tensors, sharing, metadata) without reading data."""

from __future__ import annotations

from torchkeep.format import (
    CheckpointInfo,
    open_source,
)
from torchkeep.io._save import PathLike


def inspect(path: PathLike) -> CheckpointInfo:
    """Describe a checkpoint (format, tensors, sharing, metadata) without reading tensor data.

    A checkpoint directory that is not a run, a ``save_model`` directory or a sharded checkpoint
    (a Trainer ``checkpoint-N/``, Accelerate ``save_state`` output) is described file by file:
    ``info.files`` lists each with its kind (checkpoint, side file...), format and size, and
    ``info.tensors`` holds every tensor as ``<file>/<name>``.
    """
    return open_source(path).info()
