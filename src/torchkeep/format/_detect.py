"""Telling formats apart by their bytes, never by the file name.

==================  =========================================================================
format              recognised by
==================  =========================================================================
torchkeep           safetensors whose header metadata has a ``torchkeep`` entry
safetensors         8-byte little-endian header length ``N`` (at most 100 MiB), then ``{`` after
                    optional JSON whitespace
torch-zip           a zip archive (``PK\\x03\\x04``) holding ``<name>/data.pkl``
torch-legacy        a pickle stream (``\\x80`` and a protocol 2-5, or torch's magic number as
                    text for protocols 0 and 1): ``torch.save`` before 1.6, or with
                    ``_use_new_zipfile_serialization=False``
torchscript         a zip holding ``constants.pkl`` or ``code/`` (``torch.jit.save``)
torch-export        a zip holding ``archive_format`` or ``models/`` (``torch.export.save``)
hf-sharded          JSON with a ``weight_map`` (``*.safetensors.index.json``, ``*.bin.index.json``)
torchkeep-model     a directory with ``torchkeep_model.json`` (``torchkeep.save_model``)
torchkeep-run       a run reference (``RUN@best``), told by ``_sources.open_source``
checkpoint-dir      a directory of checkpoint files (``checkpoint-N/``), told by ``_sources``
==================  =========================================================================

Safetensors is tried first, because its first bytes are a number and can be anything: a header
of 128 + 256k bytes starts with ``\\x80`` like a pickle, one of 0x04034B50 bytes with ``PK\\x03\\x04``
like a zip. The test is structural (a plausible length, then JSON's ``{`` at byte 8), and no other
format passes it: a zip has its compression method at byte 8 (0 or 8), a torch pickle its magic
number or a frame length, and JSON text (a sharded index) an ASCII start, which as a length is far
beyond the limit.
"""

from __future__ import annotations

import difflib
import json
import os
import struct
import zipfile
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

from torchkeep.errors import CheckpointNotFoundError, CorruptCheckpointError
from torchkeep.format._safetensors import HEADER_LIMIT
from torchkeep.storage import local_path, storage_for

MODEL_FILE = "torchkeep_model.json"
HF_INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILE_NAMES = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth")


class Format(StrEnum):
    TORCHKEEP = "torchkeep"
    SAFETENSORS = "safetensors"
    TORCH_ZIP = "torch-zip"
    TORCH_LEGACY = "torch-legacy"
    TORCHSCRIPT = "torchscript"
    TORCH_EXPORT = "torch-export"
    HF_SHARDED = "hf-sharded"
    MODEL_DIR = "torchkeep-model"
    # Not told by detect(), which reads one file: open_source() recognises these first.
    RUN = "torchkeep-run"
    CHECKPOINT_DIR = "checkpoint-dir"
    REGISTRY = "torchkeep-registry"  # REGISTRY/NAME@VERSION_OR_ALIAS
    DCP = "dcp"  # a torch.distributed.checkpoint directory (.metadata + .distcp files)


def resolve_path(path: str | os.PathLike[str]) -> Path:
    """``path`` itself when it is a file; in a directory, the checkpoint file it holds."""
    p = local_path(path)
    if not p.exists():
        hint = "check the path"
        if p.parent.is_dir():
            listed = storage_for(p.parent).list(str(p.parent))
            names = [n for n in listed if not n.startswith(".")]
            near = difflib.get_close_matches(p.name, names, n=5, cutoff=0.5)
            if near:
                hint = f"check the path; did you mean {' or '.join(near)} in {p.parent}?"
        raise CheckpointNotFoundError("no such file or directory", path=str(p), hint=hint)
    if not p.is_dir():
        return p
    if (p / MODEL_FILE).is_file():
        return p
    for name in (*HF_INDEX_NAMES, *SINGLE_FILE_NAMES):
        if (p / name).is_file():
            return p / name
    raise CheckpointNotFoundError(
        "the directory holds no checkpoint torchkeep recognises",
        path=str(p),
        hint="pass a file, or a directory made by torchkeep.save_model or holding "
        "model.safetensors / a Hugging Face *.index.json",
    )


def detect(path: Path) -> Format:
    """The format of the file (or model directory) at ``path``, from its content."""
    if path.is_dir():
        return Format.MODEL_DIR
    store = storage_for(path)
    size = store.size(str(path))
    if size == 0:
        raise CorruptCheckpointError("the file is empty (0 bytes)", path=str(path), hint=_HINT)
    with store.open_read(str(path)) as f:
        head = f.read(64)
        if _is_safetensors(f, head):
            return Format.SAFETENSORS  # torchkeep or plain: the reader validates the header
    if head.startswith(b"PK\x03\x04"):
        return _zip_kind(path)
    if (head[:1] == b"\x80" and head[1:2] in _PICKLE_PROTOCOLS) or head.startswith(_TEXT_MAGIC):
        return Format.TORCH_LEGACY
    if head.lstrip()[:1] == b"{" and size < 64 * 1024 * 1024:
        with store.open_read(str(path)) as f:
            data = f.read()
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError):  # "{" + "[" * 10**5
            doc = None
        if isinstance(doc, dict) and "weight_map" in doc:
            return Format.HF_SHARDED
    if path.suffix.lower() == ".onnx":
        raise CorruptCheckpointError(
            "an ONNX model, not a checkpoint",
            path=str(path),
            hint="run it with torchkeep.load_exported(path) or ONNX Runtime",
        )
    raise CorruptCheckpointError(
        f"unrecognised format (first bytes {head[:8]!r})",
        path=str(path),
        hint="torchkeep reads safetensors, torch.save files (.pt/.pth/.bin/.ckpt/.tar) and "
        "Hugging Face sharded index files; this file is none of them, or is damaged",
    )


_HINT = "the file is damaged or was never written completely; restore it from a copy"
_PICKLE_PROTOCOLS = (b"\x02", b"\x03", b"\x04", b"\x05")
# torch.save's magic number, pickled with protocol 0 or 1 (a LONG opcode in decimal text).
_TEXT_MAGIC = b"L119547037146038801333356L\n"
_JSON_SPACE = b" \t\n\r"


def _is_safetensors(f: BinaryIO, head: bytes) -> bool:
    """True when the file opens like safetensors: a length within the limit, then a JSON object.

    The header may start with whitespace (JSON allows it; writers pad at the end, some at the
    start), so the first character that is not whitespace must be ``{``, within the header.
    """
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    if n == 0 or n > HEADER_LIMIT:
        return False
    f.seek(8)
    remaining = n
    while remaining > 0:
        chunk = f.read(min(remaining, 64 * 1024))
        if not chunk:  # truncated inside leading whitespace: not worth calling safetensors
            return False
        rest = chunk.lstrip(_JSON_SPACE)
        if rest:
            return rest[:1] == b"{"
        remaining -= len(chunk)
    return False


def _zip_kind(path: Path) -> Format:
    try:
        with storage_for(path).open_read(str(path)) as f, zipfile.ZipFile(f) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError) as exc:
        # NotImplementedError: a member's "version needed" is above what zipfile reads
        raise CorruptCheckpointError(
            f"a damaged zip archive ({type(exc).__name__}: {exc})", path=str(path), hint=_HINT
        ) from exc
    tails = {n.split("/", 1)[1] if "/" in n else n for n in names}
    if "constants.pkl" in tails or any(t.startswith("code/") for t in tails):
        return Format.TORCHSCRIPT
    if "archive_format" in tails or any(t.startswith("models/") for t in tails):
        return Format.TORCH_EXPORT
    if "data.pkl" in tails:
        return Format.TORCH_ZIP
    raise CorruptCheckpointError(
        "a zip archive that is not a torch checkpoint (no data.pkl)", path=str(path), hint=_HINT
    )
