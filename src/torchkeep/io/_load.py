"""``load``: any checkpoint the registry of readers knows, without running code from it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from torchkeep.format import (
    MapLocation,
    open_source,
)
from torchkeep.io._save import PathLike
from torchkeep.storage._location import with_options


def load(
    path: PathLike,
    *,
    map_location: MapLocation = None,
    dtype: torch.dtype | None = None,
    trust: bool = False,
    verify: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> Any:
    """Load a checkpoint of any supported format without running code from it.

    Reads torchkeep and plain safetensors files, Hugging Face sharded checkpoints (the
    ``*.index.json`` or its directory), and ``torch.save`` files through
    ``torch.load(weights_only=True)`` only. The format is detected from the bytes. Tensors stay
    mapped from the file until used.

    Args:
        path: a file, or a directory holding one checkpoint.
        map_location: as in ``torch.load``: a device, a string, a dict of location to location, or
            a callable ``(storage, location) -> storage``. ``None`` keeps each tensor where it was
            saved.
        dtype: cast floating-point tensors to this dtype (integer, bool and complex are kept).
        trust: allow a ``torch.save`` file to import the globals it names. That runs code from the
            file: only for files you trust. Not needed for the harmless values real checkpoints
            carry (numpy arrays, scalars and dtypes, ``pathlib`` paths, ``torch.__version__``):
            torchkeep rebuilds those itself.
        verify: check every tensor against the hash recorded when it was saved (torchkeep
            ``.safetensors`` and ``.pt`` files and run checkpoints; the default, which reads every
            tensor once, at ~10 GB/s), and the zip's CRC-32 of every member of a torch zip file
            from elsewhere. Plain safetensors and legacy torch files store no checksum.
            ``False`` skips that and keeps tensors lazily mapped.

    Raises:
        CheckpointNotFoundError: nothing at ``path``.
        CorruptCheckpointError: the file is damaged or in no format torchkeep reads.
        UnsafeCheckpointError: the file needs globals the safe unpickler refuses (names them).
    """
    path = with_options(path, storage_options)
    return open_source(path).load(
        map_location=map_location, dtype=dtype, trust=trust, verify=verify
    )
