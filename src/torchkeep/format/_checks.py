"""Integrity checks of one checkpoint file per format, for ``verify``: every problem, not the first.

Each reader of the registry (``_sources.py``) checks its own format with one of these; what a
check can prove depends on what the format records (see ``FileCheck.check``). A check never
raises for damage: it reports it, so that a directory or a sharded checkpoint is checked whole.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torchkeep.errors import TorchkeepError
from torchkeep.format._artifact import SafetensorsFile
from torchkeep.format._describe import describe, shard_files, tensors_by_path
from torchkeep.format._detect import Format
from torchkeep.format._directory import unsafe_summary
from torchkeep.format._hash import tensor_hash
from torchkeep.format._info import FileCheck
from torchkeep.format._pickle_files import scan_file
from torchkeep.format._torchfile import (
    damaged_members,
    damaged_records,
    damaged_tensors,
    is_hashed,
    load_torch,
    read_document,
)


def damaged(shown: str, fmt: str | None, *problems: str) -> FileCheck:
    """The check of a file that could not be read as its format at all."""
    return FileCheck(path=shown, format=fmt, status="damaged", problems=problems)


def check_safetensors(p: Path, shown: str) -> FileCheck:
    try:
        st = SafetensorsFile(str(p))
        hashes = st.hashes
        bad = st.damaged()
    except TorchkeepError as exc:
        return damaged(shown, Format.SAFETENSORS.value, exc.message)
    problems = [f"tensor {k!r} does not match its hash" for k in bad]
    unhashed = [k for k in st.header.entries if k not in hashes]
    try:
        for key in unhashed:  # plain safetensors: read every byte, check what the layout allows
            t = st.tensor(key)
            tensor_hash(t)
            st.mapped.release(t)
        st.load(verify=False)  # the structure must rebuild (skeleton, views)
    except TorchkeepError as exc:
        problems.append(exc.message)
    stored = len(st.header.entries)
    return FileCheck(
        path=shown,
        format=st.format,
        status="damaged" if problems else "ok",
        check="xxh3_128" if hashes else None,
        tensors=stored,
        hashed=len(hashes) - len(bad),
        structural=len(unhashed),
        damaged=len(bad),
        problems=tuple(problems),
    )


def _stored_tensors(obj: Any) -> int:
    return sum(t.shared_with is None for t in describe(obj))


def check_torch(p: Path, shown: str, fmt: Format) -> FileCheck:
    path, is_zip = str(p), fmt is Format.TORCH_ZIP
    try:
        found = scan_file(p)
        doc = read_document(path) if is_zip else None
    except TorchkeepError as exc:
        return damaged(shown, fmt.value, exc.message)
    hashed_file = is_hashed(doc)
    problems: list[str] = []
    if is_zip:  # bytes first: a damaged pickle is damage, not danger
        problems = damaged_records(path, doc) if doc is not None and hashed_file else []
        problems += damaged_members(path, skip_storages=hashed_file)
        problems = list(dict.fromkeys(problems))  # a bad CRC is found by both
    if not found.is_safe:
        return FileCheck(
            path=shown,
            format=fmt.value,
            status="damaged" if problems else "unsafe",
            check="crc32" if is_zip else None,
            problems=(*problems, unsafe_summary(found.unsafe)),
        )
    try:
        obj = load_torch(path, map_location="cpu", trust=False, zip_format=is_zip)
    except TorchkeepError as exc:
        return damaged(shown, fmt.value, *problems, exc.message)
    check: str | None
    if doc is not None and hashed_file:
        good, bad = damaged_tensors(obj, doc, path=path)
        problems += bad
        stored, hashed, broken, check = good + len(bad), good, len(bad), "xxh3_128"
    else:
        stored = _stored_tensors(obj)
        broken = sum("/data/" in x for x in problems)  # storage members failing their CRC
        hashed = max(stored - broken, 0) if is_zip else 0
        check = "crc32" if is_zip else None
        if not is_zip:  # legacy: no checksum; torch.load read every byte, touch them anyway
            for t in tensors_by_path(obj).values():
                tensor_hash(t)
    return FileCheck(
        path=shown,
        format=fmt.value,
        status="damaged" if problems else "ok",
        check=check,
        tensors=stored,
        hashed=hashed,
        structural=0 if is_zip else stored,
        damaged=broken,
        problems=tuple(problems),
    )


def check_archive(p: Path, shown: str, fmt: Format) -> FileCheck:
    """A TorchScript or torch.export archive: a program; its zip checksums are what we check."""
    problems = damaged_members(str(p))
    return FileCheck(
        path=shown,
        format=fmt.value,
        status="damaged" if problems else "ok",
        check="crc32",
        problems=tuple(problems),
    )


def check_sharded(
    index: Path, shown: str, check_file: Callable[[Path, str], FileCheck], load: Callable[[], Any]
) -> FileCheck:
    """A Hugging Face sharded checkpoint: every shard, then the index against the shards."""
    try:
        weight_map, _ = shard_files(index)
    except TorchkeepError as exc:
        return damaged(shown, Format.HF_SHARDED.value, exc.message)
    parts: list[FileCheck] = []
    problems: list[str] = []
    for name in dict.fromkeys(weight_map.values()):
        if (index.parent / name).is_file():
            parts.append(check_file(index.parent / name, name))
        else:
            problems.append(f"shard {name} listed in the index is missing")
    problems += [f"{c.path}: {x}" for c in parts for x in c.problems]
    if not problems:
        try:
            load()  # every indexed tensor is in its shard
        except TorchkeepError as exc:
            problems.append(exc.message)
    checks = {c.check for c in parts}
    return FileCheck(
        path=shown,
        format=Format.HF_SHARDED.value,
        status="damaged" if problems else "ok",
        check=checks.pop() if len(checks) == 1 else None,
        tensors=sum(c.tensors for c in parts),
        hashed=sum(c.hashed for c in parts),
        structural=sum(c.structural for c in parts),
        damaged=sum(c.damaged for c in parts),
        problems=tuple(problems),
    )
