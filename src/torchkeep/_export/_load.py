"""``torchkeep.load_exported``, and the loader ``export`` checks its artifact with.

Kept apart from ``_api.py`` because loading is the half users call on a machine without the
model's code: it needs only the exported file and the runtime that runs it.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from torchkeep._export import _onnx, _pt2, _torchscript
from torchkeep.errors import (
    CheckpointNotFoundError,
    UnsafeCheckpointError,
)
from torchkeep.format import Format, detect
from torchkeep.storage import local_path

#: The artifact kinds ``export`` writes.
ExportFormat = Literal["onnx", "pt2", "torchscript"]


def loader(fmt: ExportFormat, path: Path) -> tuple[Callable[..., Any], str]:
    """The artifact loaded back from its file, and what runs it."""
    if fmt == "onnx":
        model = _onnx.OnnxModel(path, spinning=False)
        _, ort = _onnx.require()
        provider = model.session.get_providers()[0]
        return model, f"onnxruntime {ort.__version__} ({provider})"
    if fmt == "pt2":
        return _pt2.load(path, trust=True).module(), f"torch {torch.__version__} (torch.export)"
    return _torchscript.load(path), f"torch {torch.__version__} (TorchScript)"


def load_exported(path: str | os.PathLike[str], *, trust: bool = False) -> Callable[..., Any]:
    """Load an exported artifact as a callable taking the model's inputs, without its code.

    * ``.onnx``: an ONNX Runtime session (:class:`OnnxModel`), returning the list of outputs.
    * ``.pt2``: ``torch.export.load(path).module()``, after checking the archive holds no
      pickled objects or compiled code (those need ``trust=True``).
    * TorchScript: ``torch.jit.load``, only with ``trust=True``: the archive carries
      TorchScript code and pickles that ``torch.jit.load`` runs.

    Raises:
        UnsafeCheckpointError: the file would run code and ``trust`` is False.
        CheckpointNotFoundError: nothing at ``path``.
    """
    p = local_path(path)
    if not p.is_file():
        raise CheckpointNotFoundError(f"no file at {p}", path=str(p))
    suffix = p.suffix.lower()
    if suffix == ".onnx":
        return _onnx.OnnxModel(p)
    if suffix == ".pt2" or (zipfile.is_zipfile(p) and detect(p) is not Format.TORCHSCRIPT):
        return _pt2.load(p, trust=trust).module()
    if not trust:
        raise UnsafeCheckpointError(
            "a TorchScript archive carries code and pickles that torch.jit.load runs",
            path=str(p),
            hint="pass trust=True if you trust its origin, or export to .pt2 or .onnx",
        )
    return _torchscript.load(p)
