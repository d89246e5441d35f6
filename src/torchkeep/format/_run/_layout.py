"""Where a run keeps its files, what their names say, and how a reference names a checkpoint.

The layout and the commit protocol are drawn in this package's ``__init__``. Names are the only
thing here that are read without opening a file: a manifest's name says its step, a pack's name
its step and a random tag, and a file is taken for a pack only when its header says so as well
(:func:`is_pack`): a name alone is no proof.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import struct
from pathlib import Path
from typing import BinaryIO

from torchkeep.errors import CheckpointNotFoundError, TorchkeepError
from torchkeep.format._artifact import METADATA_KEY, PACK_KIND
from torchkeep.format._confine import lstat_inside
from torchkeep.format._json import parse_json
from torchkeep.format._safetensors import HEADER_LIMIT
from torchkeep.storage import local_path, storage_for

RUN_FILE = "torchkeep_run.json"
MANIFEST_DIR = "checkpoints"
PACK_DIR = "packs"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".lock"
# ASCII digits, at most 19 (an int64 step): \d alone also matches "٤" and runs int() refuses
_MANIFEST_NAME = re.compile(r"^([0-9]{10,19})\.json$", re.ASCII)
_PACK_NAME = re.compile(r"^[0-9]{10,}-[0-9a-f]{8}\.safetensors$", re.ASCII)  # as pack_name() names
_REFERENCE = re.compile(r"^(?P<run>.+)@(?P<which>latest|best|[0-9]{1,19})$", re.ASCII)
# Packs written before the "kind" marker: exactly these fields (tk.save's files add "hashes").
_LEGACY_PACK_FIELDS = {
    "format_version",
    "torchkeep_version",
    "torch_version",
    "skeleton",
    "raw",
    "metadata",
}


def manifest_name(step: int) -> str:
    return f"{step:010d}.json"


def pack_name(step: int) -> str:
    """A new pack's name: the step it was written for and a random tag, so never reused."""
    return f"{step:010d}-{secrets.token_hex(4)}.safetensors"


def is_pack_name(name: str) -> bool:
    return _PACK_NAME.match(name) is not None


def is_run(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a run directory."""
    return (local_path(path) / RUN_FILE).is_file()  # a URL's RemotePath asks its store


def check_layout(root: Path) -> None:
    """Refuse a run whose own files or folders are symbolic links (or of the wrong kind).

    Raises:
        CorruptCheckpointError: naming the entry, e.g. ``packs is a symbolic link``.
    """
    for name in (MANIFEST_DIR, PACK_DIR):
        lstat_inside(root, name, kind="dir")
    for name in (RUN_FILE, METRICS_FILE, LOCK_FILE):
        lstat_inside(root, name, kind="file")


def committed_steps(root: Path) -> list[int]:
    """Steps of the committed manifests of the run at ``root``, ascending (by their names)."""
    if lstat_inside(root, MANIFEST_DIR, kind="dir") is None:
        return []
    names = storage_for(root).list(str(root / MANIFEST_DIR))  # a missing directory has none
    found = (_MANIFEST_NAME.match(name) for name in names)
    return sorted(int(m[1]) for m in found if m)


def parse_reference(text: str | os.PathLike[str]) -> tuple[Path, str] | None:
    """``"runs/x@best"`` -> ``(Path("runs/x"), "best")``; a bare run directory means its latest.

    A URL works the same (``s3://bucket/x@best``); its run comes back as a
    :class:`~torchkeep.storage.RemotePath` with the same storage options.

    Returns ``None`` when ``text`` is no run reference (an ordinary file path).
    """
    location = local_path(text)  # a URL stays a URL (never a local folder named "s3:")
    text = os.fspath(text)

    def run_of(run: str) -> Path:
        if location.name.endswith(text[len(run) :]) and "@" in location.name:
            return location.with_name(location.name[: len(location.name) - len(text) + len(run)])
        return local_path(run)

    match = _REFERENCE.match(text)
    if match and is_run(run_of(match["run"])):
        return run_of(match["run"]), match["which"]
    if is_run(location):
        return location, "latest"
    run, at, which = text.rpartition("@")
    if at and run and is_run(run_of(run)):
        # `RUN@bset` would otherwise be looked up as a file named "RUN@bset": not found.
        raise CheckpointNotFoundError(
            f"unknown selector {which!r} in run reference {text!r}",
            path=text,
            expected=["latest", "best", "<step>"],
            actual=which,
            hint="use RUN@latest, RUN@best or RUN@<step>; steps in this run: "
            f"{steps_text(committed_steps(run_of(run)))}",
        )
    return None


def steps_text(steps: list[int]) -> str:
    """The last ten steps, for a hint."""
    if not steps:
        return "none"
    shown = ", ".join(map(str, steps[-10:]))
    return shown if len(steps) <= 10 else f"... {shown}"


def is_pack(f: BinaryIO) -> bool:
    """Whether the open file ``f`` is a pack a run wrote: its header says
    ``"kind": "torchkeep-pack"`` (or has exactly the fields packs had before that marker).

    The storage opens the file without following a link, once it found a regular file.
    """
    head = f.read(8)
    if len(head) < 8:
        return False
    (n,) = struct.unpack("<Q", head)
    if n > HEADER_LIMIT:
        return False
    try:
        header = parse_json(f.read(n), what="pack header", path=getattr(f, "name", "pack"))
        document = json.loads(header["__metadata__"][METADATA_KEY])
    except (ValueError, KeyError, TypeError, RecursionError, TorchkeepError):
        return False
    if not isinstance(document, dict):
        return False
    legacy = set(document) == _LEGACY_PACK_FIELDS and document.get("metadata") == {}
    return document.get("kind") == PACK_KIND or legacy
