"""``convert``: a checkpoint to another format, by the destination's suffix, keys optionally reshaped."""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from torchkeep.errors import (
    IncompatibleStateError,
    InvalidArgumentError,
)
from torchkeep.format import (
    CheckpointInfo,
    Format,
    Manifest,
    RunReader,
    load_reference,
    write_sharded,
)
from torchkeep.io._inspect import inspect
from torchkeep.io._load import load
from torchkeep.io._save import TORCH_SUFFIXES, PathLike, save
from torchkeep.state import (
    adapt_keys,
    find_state,
)
from torchkeep.storage import local_path, storage_for
from torchkeep.storage._location import with_options

#: The suffixes ``convert`` writes, and the format each gives.
CONVERT_SUFFIXES = {".safetensors": "safetensors", **dict.fromkeys(sorted(TORCH_SUFFIXES), "torch")}


def _check_convert_suffix(target: Path) -> None:
    suffix = target.suffix.lower()
    if suffix in CONVERT_SUFFIXES:
        return
    known = ", ".join(CONVERT_SUFFIXES)
    hint = f"name the output with one of {known}"
    if suffix in (".onnx", ".pt2"):
        hint += f"; to export a model to {suffix}, use torchkeep.export (torchkeep export)"
    raise InvalidArgumentError(
        f"convert cannot write {f'a {suffix} file' if suffix else 'a path without a suffix'}: "
        "it writes "
        f"safetensors (.safetensors) and torch files ({', '.join(sorted(TORCH_SUFFIXES))})",
        path=str(target),
        expected=list(CONVERT_SUFFIXES),
        actual=suffix,
        hint=hint,
    )


def convert(
    source: PathLike,
    destination: PathLike,
    *,
    strip_prefix: str | None = None,
    rename: Mapping[str, str] | None = None,
    dtype: torch.dtype | None = None,
    only: str | list[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> CheckpointInfo:
    """Convert a checkpoint to another format (by ``destination``'s suffix), optionally reshaping it.

    Without key options the whole structure is kept, so a legacy ``.pt`` becomes a safetensors
    file holding the same checkpoint dict. With ``strip_prefix``, ``rename`` or ``only``, the
    state dict inside the checkpoint (the largest dict of tensors, e.g. ``state_dict``) is
    written alone, with its keys changed. The source is read safely (``weights_only``).

    Args:
        source: any checkpoint :func:`load` reads.
        destination: ``.safetensors`` (default) or ``.pt/.pth/.bin/.ckpt/.tar``.
        strip_prefix: removed from the start of every key that has it (``"module."``).
        rename: regular expression -> replacement, applied to the keys in order.
        dtype: cast floating-point tensors (``torch.bfloat16``).
        only: glob(s) over the source keys to keep (``"encoder.*"``).

    Returns:
        :func:`inspect` of the written file.

    Raises:
        TorchkeepError: ``destination``'s suffix names no format ``convert`` writes (the
            message lists those it does); nothing is read or written.
    """
    source = with_options(source, storage_options)
    destination = with_options(destination, storage_options)
    target = local_path(destination)
    _check_convert_suffix(target)
    reshaped = strip_prefix is not None or rename or only
    info = inspect(source)
    metadata = {**info.metadata, "converted_from": os.fspath(source)}
    streams = not reshaped and CONVERT_SUFFIXES[target.suffix.lower()] == "safetensors"
    run = streams and info.format == Format.RUN.value
    if run and _stream_sharded(info.path, target, metadata, dtype):  # sharded: tensor by tensor
        return inspect(destination)
    obj = load(source, dtype=dtype)
    if reshaped:
        state, _ = find_state(set(), obj)
        patterns = [only] if isinstance(only, str) else list(only or [])
        keys = [
            k for k in state if not patterns or any(fnmatch.fnmatchcase(k, p) for p in patterns)
        ]
        if not keys:
            raise IncompatibleStateError(
                f"no tensor key matches {patterns}", path=os.fspath(source), hint="check --only"
            )
        rules = dict(rename or {})
        if strip_prefix:
            rules = {"^" + re.escape(strip_prefix): "", **rules}
        mapping, _ = adapt_keys(keys, [], rules, path=os.fspath(source))
        obj = {mapping[k]: state[k] for k in keys}
    save(obj, destination, metadata=metadata)
    return inspect(destination)


def _stream_sharded(
    reference: str, target: Path, metadata: dict[str, Any], dtype: torch.dtype | None
) -> bool:
    """Write a run checkpoint saved in shards to ``target`` tensor by tensor (never assembled
    whole, ``format/_sharded_write.py``); False when the checkpoint is not sharded."""

    def write(run: RunReader, manifest: Manifest) -> bool:
        if manifest.sharded is None:
            return False
        storage_for(target).write_atomic(
            str(target),
            lambda f: write_sharded(f, run, manifest, metadata, dtype=dtype),
            sequential=True,
        )
        return True

    return bool(load_reference(reference, write))
