"""torch.export: capture to an ``ExportedProgram``, save as ``.pt2``, load it back safely.

``torch.export.load`` unpickles parts of the archive: pickled weights and constants with
``weights_only=False``, custom objects with ``pickle.loads``, and the sample inputs with a
fallback to ``weights_only=False`` when the safe unpickler refuses them. :func:`check_archive`
reads the archive's own tables first and refuses any of those routes (and compiled code, which
AOTInductor packages carry) unless the caller trusts the file.
"""

from __future__ import annotations

import io
import json
import posixpath
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchkeep._export._inputs import Inputs
from torchkeep.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    ExportError,
    UnsafeCheckpointError,
)
from torchkeep.format._pickle_files import is_compiled_code, read_member

__all__ = ["capture", "check_archive", "load", "static_dims"]

_TRUST_HINT = "export it again with torchkeep, or pass trust=True if you trust its origin"


def capture(model: nn.Module, inputs: Inputs, dynamic_shapes: Any) -> torch.export.ExportedProgram:
    """``torch.export.export`` of the model (non-strict: ``forward`` runs as Python)."""
    return torch.export.export(
        model, inputs.args, inputs.kwargs or None, dynamic_shapes=dynamic_shapes, strict=False
    )


def static_dims(
    program: torch.export.ExportedProgram, names: list[str], dims: list[dict[int, str]]
) -> list[str]:
    """The requested dynamic dimensions that came out static (``"x dim 0 (batch) = 2"``)."""
    placeholders = {
        n.name: n for n in program.graph.nodes if n.op == "placeholder" and "val" in n.meta
    }
    user = [placeholders.get(name) for name in program.graph_signature.user_inputs]
    tensors = [
        n.meta["val"] for n in user if n is not None and isinstance(n.meta["val"], torch.Tensor)
    ]
    out = []
    for name, val, wanted in zip(names, tensors, dims, strict=False):
        for dim, label in wanted.items():
            size = val.shape[dim]
            if isinstance(size, int):
                out.append(f"{name} dim {dim} ({label}) = {size}")
    return out


def _unsafe(path: str, what: str, globals_: list[str] | None = None) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"loading this .pt2 archive would run code from it: {what}",
        path=path,
        globals=globals_,
        hint=_TRUST_HINT,
    )


def check_archive(path: Path, *, trust: bool) -> None:
    """Refuse a ``.pt2`` whose loading would unpickle arbitrary objects or load compiled code.

    Raises:
        UnsafeCheckpointError: pickled weights or constants, custom objects, sample inputs that
            torch's safe unpickler refuses, compiled libraries, or the pre-2.8 archive format.
        CorruptCheckpointError: not a zip archive, or tables that cannot be parsed.
    """
    p = str(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"no file at {p}", path=p)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise CorruptCheckpointError(f"not a .pt2 (zip) archive: {exc}", path=p) from exc
    with archive:
        names = archive.namelist()
        root = names[0].split("/", 1)[0] + "/" if names else ""
        for name in names:
            norm = posixpath.normpath(name)
            if name.startswith("/") or norm.startswith("..") or not name.startswith(root):
                raise CorruptCheckpointError(f"archive member {name!r} escapes the archive", path=p)
        if trust:
            return
        compiled = [n for n in names if is_compiled_code(n)]
        if compiled:
            raise _unsafe(p, f"it holds compiled code ({', '.join(compiled[:3])})")
        if root + "archive_format" not in names:
            raise _unsafe(p, "it is in the pre-2.8 format, which torch loads through pickle")
        for name in names:
            rel = name[len(root) :]
            if rel.startswith("data/constants/") and rel.endswith(".pt"):
                raise _unsafe(p, f"{rel} is a pickled constants file")
            if rel.endswith(("_weights_config.json", "_constants_config.json")):
                _check_config(p, rel, read_member(archive, name, p))
            if rel.startswith("data/sample_inputs/"):
                _check_sample_inputs(p, rel, read_member(archive, name, p))


def _check_config(path: str, rel: str, data: bytes) -> None:
    try:
        config = json.loads(data)["config"]
        entries = list(config.items())
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptCheckpointError(f"{rel} is not a payload table: {exc}", path=path) from exc
    for fqn, meta in entries:
        if not isinstance(meta, dict):
            raise CorruptCheckpointError(f"{rel}: entry {fqn!r} is not an object", path=path)
        if meta.get("use_pickle"):
            raise _unsafe(path, f"{rel} stores {fqn!r} as a pickle")
        name = str(meta.get("path_name", ""))
        if "constants" in rel and not name.startswith("tensor_"):
            raise _unsafe(path, f"{rel} stores {fqn!r} as a pickled object ({name})")


def _check_sample_inputs(path: str, rel: str, data: bytes) -> None:
    if not data:
        return
    # torch tries weights_only=True first and falls back to weights_only=False on failure:
    # the archive is safe only if the safe unpickler accepts it.
    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except Exception as exc:
        raise _unsafe(path, f"{rel} needs objects torch's safe unpickler refuses: {exc}") from None


def load(path: Path, *, trust: bool = False) -> torch.export.ExportedProgram:
    """``torch.export.load`` after :func:`check_archive`."""
    check_archive(path, trust=trust)
    try:
        return torch.export.load(path)
    except Exception as exc:
        raise ExportError(
            f"torch {torch.__version__} cannot load this .pt2 archive: {exc}",
            path=str(path),
            hint="load it with the torch version that wrote it (.pt2 files are not "
            "guaranteed to load across torch versions)",
        ) from exc
