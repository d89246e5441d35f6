"""``save``: one nested state to one file, atomically; the writer chosen by the suffix."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torchkeep.errors import (
    UnsupportedValueError,
)
from torchkeep.format import (
    write_artifact,
    write_torch,
)
from torchkeep.storage import local_path, storage_for
from torchkeep.storage._location import with_options

PathLike = str | os.PathLike[str]
#: Suffixes that get torch's zip format (``torch.load`` reads them); any other gets safetensors.
TORCH_SUFFIXES = frozenset({".pt", ".pth", ".tar", ".bin", ".ckpt"})


def save(
    obj: Any,
    path: PathLike,
    *,
    metadata: dict[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Save a state dict or a nested checkpoint dict to one file, atomically.

    A ``.pt``, ``.pth``, ``.tar``, ``.bin`` or ``.ckpt`` path gives torch's zip format, loadable by
    ``torch.load(weights_only=True)``; any other path (``.safetensors``) gives a plain safetensors
    file whose header also holds the nested structure and ``metadata``. Tensors sharing storage
    (tied weights) are stored once. A crash mid-save leaves the previous file intact.

    Args:
        obj: dicts, lists, tuples and sets of tensors, numbers, strings, bools, None, bytes,
            numpy arrays, scalars and dtypes, ``pathlib`` paths, ``torch.__version__``,
            ``torch.Size``, ``torch.dtype`` and ``torch.device``. In a ``.pt`` file, numpy
            values, paths and the torch version are pickled as ``torch.save`` pickles them:
            ``torchkeep.load`` reads them back, plain ``torch.load(weights_only=True)`` only
            with those globals allow-listed.
        path: the destination file.
        metadata: JSON-able information kept beside the tensors (hyperparameters, metrics...).

    Raises:
        UnsupportedValueError: ``obj`` holds a value that could only be stored by pickling code.
        StorageError: the disk failed (full, read-only, permission denied).

    Example:
        >>> torchkeep.save({"epoch": 3, "model_state_dict": model.state_dict()}, "ckpt.safetensors",
        ...                metadata={"lr": 1e-3})
    """
    path = with_options(path, storage_options)
    target = local_path(path)
    store = storage_for(target)
    try:
        if target.suffix.lower() in TORCH_SUFFIXES:
            store.write_atomic(str(target), lambda f: write_torch(obj, f, metadata))
        else:
            store.write_atomic(
                str(target), lambda f: write_artifact(obj, f, metadata), sequential=True
            )
    except UnsupportedValueError as err:
        if err.path is None:  # the flattener knows the key, not the file
            err.path = str(target)
        raise
