"""Checkpoint directories that are not torchkeep's: a Trainer ``checkpoint-N/``, Accelerate state.

Such a directory holds several checkpoint files (``model.safetensors``, ``optimizer.pt``,
``scheduler.pt``, ``rng_state.pth``, ``training_args.bin``, ``random_states_0.pkl``...) beside
JSON side files (``trainer_state.json``, ``config.json``). ``inspect``, ``verify`` and ``scan``
cover every file of it; loading a directory still means loading its model weights
(:func:`resolve_path`).

A file is a checkpoint file when its bytes say so (see :mod:`._detect`), or when its name ends
like one (``.pt``, ``.safetensors``...) even though its bytes are unreadable: that is a damaged
checkpoint, not a side file. JSON files are side files; anything else is listed as ``other``.
Subdirectories are listed, not looked into.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torchkeep.errors import TorchkeepError, UnsafeCheckpointError
from torchkeep.format._detect import HF_INDEX_NAMES, MODEL_FILE, Format, detect
from torchkeep.format._info import CheckpointInfo, FileInfo, TensorInfo
from torchkeep.format._run import is_run
from torchkeep.storage import local_path, storage_for

CHECKPOINT_DIR = "checkpoint-dir"
CHECKPOINT_SUFFIXES = frozenset(
    {".pt", ".pth", ".bin", ".ckpt", ".tar", ".pkl", ".safetensors", ".pt2"}
)
PICKLE_FORMATS = frozenset(
    {Format.TORCH_ZIP, Format.TORCH_LEGACY, Format.TORCHSCRIPT, Format.TORCH_EXPORT}
)


@dataclass(frozen=True, slots=True)
class Entry:
    """One file of a checkpoint directory, classified (see the module docstring)."""

    path: Path
    name: str
    kind: str  # "checkpoint", "side-file", "other", "directory"
    format: Format | None  # None for side files, other files and damaged checkpoints
    error: TorchkeepError | None = None  # why a checkpoint file's format is unknown

    @property
    def size(self) -> int:
        return 0 if self.kind == "directory" else storage_for(self.path).size(str(self.path))


def is_checkpoint_dir(path: str | os.PathLike[str]) -> bool:
    """A directory holding checkpoint files that is neither a run, a ``save_model`` directory
    nor a sharded checkpoint (those have readers of their own)."""
    p = local_path(path)
    if not p.is_dir() or is_run(p) or (p / MODEL_FILE).is_file():
        return False
    if any((p / name).is_file() for name in HF_INDEX_NAMES):
        return False
    return any(e.kind == "checkpoint" for e in entries(p))


def entries(directory: Path) -> list[Entry]:
    """Every file and subdirectory of ``directory``, by name, classified."""
    out: list[Entry] = []
    for p in sorted(directory.iterdir(), key=lambda q: q.name):
        if p.is_dir():
            out.append(Entry(p, p.name, "directory", None))
            continue
        try:
            out.append(Entry(p, p.name, "checkpoint", detect(p)))
        except (TorchkeepError, OSError) as exc:
            error = exc if isinstance(exc, TorchkeepError) else TorchkeepError(str(exc))
            if p.suffix.lower() == ".json":
                out.append(Entry(p, p.name, "side-file", None))
            elif p.suffix.lower() in CHECKPOINT_SUFFIXES:
                out.append(Entry(p, p.name, "checkpoint", None, error))
            else:
                out.append(Entry(p, p.name, "other", None))
    return out


def unsafe_summary(globals_: tuple[str, ...] | list[str], fallback: str = "") -> str:
    """``"unsafe, not loaded: imports a.B, c.D (+3 more)"`` for a file torchkeep refuses."""
    if not globals_:
        return f"unsafe, not loaded: {fallback}"
    shown = ", ".join(globals_[:3]) + (f" (+{len(globals_) - 3} more)" if len(globals_) > 3 else "")
    return f"unsafe, not loaded: imports {shown}"


def side_file_summary(path: Path) -> tuple[str, str | None]:
    """One line on a JSON side file, and the problem when it is not valid JSON."""
    try:
        with storage_for(path).open_read(str(path)) as f:
            doc = json.loads(f.read())
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        return "", f"not valid JSON ({exc})"
    if isinstance(doc, dict):
        keys = list(doc)
        shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
        step = f"global_step {doc['global_step']}; " if "global_step" in doc else ""
        return f"{step}JSON object, {len(keys)} key(s): {shown}", None
    return f"JSON {type(doc).__name__}", None


def _refused(e: Entry, format: str | None, problem: str) -> FileInfo:
    """A file of the directory that could not be described, and why."""
    return FileInfo(name=e.name, kind=e.kind, format=format, file_bytes=e.size, problem=problem)


def inspect_directory(
    directory: Path, inspect_file: Callable[[Path], CheckpointInfo]
) -> CheckpointInfo:
    """Describe every file of a checkpoint directory; tensors are named ``<file>/<tensor>``.

    ``inspect_file`` describes one checkpoint file (the reader's, which dispatches here).
    """
    files: list[FileInfo] = []
    tensors: list[TensorInfo] = []
    for e in entries(directory):
        fmt = e.format.value if e.format is not None else None
        if e.kind == "side-file":
            summary, problem = side_file_summary(e.path)
            files.append(
                FileInfo(
                    name=e.name,
                    kind=e.kind,
                    format="json",
                    file_bytes=e.size,
                    summary=summary,
                    problem=problem,
                )
            )
            continue
        if e.kind != "checkpoint":
            what = "a directory, not looked into" if e.kind == "directory" else "not a checkpoint"
            files.append(
                FileInfo(name=e.name, kind=e.kind, format=None, file_bytes=e.size, summary=what)
            )
            continue

        if e.error is not None:
            files.append(_refused(e, None, f"damaged: {e.error.message}"))
            continue
        try:
            info = inspect_file(e.path)
        except UnsafeCheckpointError as exc:
            files.append(_refused(e, fmt, unsafe_summary(exc.globals, exc.message)))
            continue
        except TorchkeepError as exc:
            files.append(_refused(e, fmt, f"damaged: {exc.message}"))
            continue
        tensors += [
            TensorInfo(
                name=f"{e.name}/{t.name}",
                dtype=t.dtype,
                shape=t.shape,
                nbytes=t.nbytes,
                shared_with=None if t.shared_with is None else f"{e.name}/{t.shared_with}",
            )
            for t in info.tensors
        ]
        files.append(
            FileInfo(
                name=e.name,
                kind=e.kind,
                format=info.format,
                file_bytes=e.size,
                tensors=len(info.tensors),
                tensor_bytes=info.total_bytes,
                summary=f"{len(info.tensors)} tensor(s), {info.num_params:,} parameter(s)",
            )
        )
    return CheckpointInfo(
        path=str(directory),
        format=CHECKPOINT_DIR,
        tensors=tuple(tensors),
        file_bytes=sum(f.file_bytes for f in files),
        files=tuple(files),
    )
