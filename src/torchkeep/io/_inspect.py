"""``inspect``: describe a checkpoint (format, tensors, sharing, metadata) without reading data."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torchkeep.format import (
    CheckpointInfo,
    open_source,
)
from torchkeep.io._save import PathLike
from torchkeep.storage._location import with_options


def inspect(path: PathLike, *, storage_options: Mapping[str, Any] | None = None) -> CheckpointInfo:
    """Describe a checkpoint (format, tensors, sharing, metadata) without reading tensor data.

    A checkpoint directory that is not a run, a ``save_model`` directory or a sharded checkpoint
    (a Trainer ``checkpoint-N/``, Accelerate ``save_state`` output) is described file by file:
    ``info.files`` lists each with its kind (checkpoint, side file...), format and size, and
    ``info.tensors`` holds every tensor as ``<file>/<name>``.
    """
    path = with_options(path, storage_options)
    return open_source(path).info()
