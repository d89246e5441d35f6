"""Checking checkpoints without trusting them: ``verify``, every problem rather than the first.

``verify`` reads a file, a checkpoint directory (a Trainer ``checkpoint-N/``), one checkpoint of
a run, or a whole run, checks its structure and every tensor's bytes against what its format
recorded, and reports every problem it finds rather than stopping at the first. What can be
checked depends on the format, and the report says which it was, per file:

==========================  ==============================================================
file                        tensor bytes checked against
==========================  ==============================================================
run checkpoint              the xxh3-128 hash in its manifest; packs against their digests
torchkeep ``.safetensors``  the xxh3-128 hash in its sealed header
torchkeep ``.pt``           the xxh3-128 hash in its sealed ``torchkeep.json`` member
other torch zip             the CRC-32 its zip records for every member
plain safetensors           nothing: structure only (header, dtypes, sizes, bounds)
legacy torch (pre-1.6)      nothing: structure only (it unpickles, safely)
==========================  ==============================================================

Runs are checked in ``_verify_runs.py``; files by their reader in the registry
(``format/_sources.py``, ``format/_checks.py``); a checkpoint directory file by file, here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torchkeep.errors import TorchkeepError
from torchkeep.format import (
    DirectorySource,
    FileCheck,
    RegistrySource,
    RunSource,
    Source,
    check_file,
    is_registry,
    locate,
    parse_reference,
    registry_checks,
)
from torchkeep.format._directory import Entry, entries, side_file_summary
from torchkeep.io._verify_report import VerifyReport
from torchkeep.io._verify_runs import verify_run
from torchkeep.storage._location import with_options


def _check_entry(e: Entry) -> FileCheck:
    if e.kind == "side-file":
        _, problem = side_file_summary(e.path)
        if problem:
            return FileCheck(path=e.name, format="json", status="damaged", problems=(problem,))
        return FileCheck(path=e.name, format="json", status="side-file")
    if e.kind != "checkpoint":
        return FileCheck(path=e.name, format=None, status="skipped")
    if e.error is not None:
        return FileCheck(path=e.name, format=None, status="damaged", problems=(e.error.message,))
    return check_file(e.path, e.name)


def _report(text: str, kind: str, files: list[FileCheck], notes: list[str]) -> VerifyReport:
    prefix = kind == "directory"
    return VerifyReport(
        target=text,
        kind=kind,
        checkpoints=sum(f.status not in ("side-file", "skipped") for f in files),
        tensors=sum(f.tensors for f in files),
        problems=tuple(f"{f.path}: {x}" if prefix else x for f in files for x in f.problems),
        notes=tuple(notes),
        hashed=sum(f.hashed for f in files),
        structural=sum(f.structural for f in files),
        damaged=sum(f.damaged for f in files),
        files=tuple(files),
    )


def verify(
    target: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None
) -> VerifyReport:
    """Check a file, a checkpoint directory, a run checkpoint (``RUN@<step>``) or a whole run.

    Every tensor is read. Run checkpoints and files written by torchkeep (``.safetensors`` and
    ``.pt``) are checked against the xxh3-128 hash recorded for each tensor; torch zip files
    from elsewhere against the CRC-32 their zip records for every member; plain safetensors and
    legacy torch files for structure only (header bounds, dtypes and sizes), which the report's
    ``structural`` count says. A checkpoint directory (a Trainer ``checkpoint-N/``, Accelerate
    state) has every file checked; pickle files that need unsafe globals are reported, not
    loaded. Every damaged tensor is reported, not only the first.

    Returns:
        A :class:`VerifyReport`; ``report.ok`` is False when anything is damaged or unsafe.
    """
    target = with_options(target, storage_options)
    text = os.fspath(target)
    parse_reference(text)  # an unknown selector (RUN@bset) raises, naming the valid ones
    if is_registry(text):  # a whole model registry: every version of every model
        return _report(text, "registry", registry_checks(text), [])
    try:
        source = locate(text)
    except TorchkeepError as exc:
        return VerifyReport(
            target=text, kind="file", checkpoints=0, tensors=0, problems=(str(exc),)
        )
    if isinstance(source, RunSource):
        try:
            return verify_run(text)
        except TorchkeepError as exc:
            return VerifyReport(
                target=text, kind="run", checkpoints=0, tensors=0, problems=(str(exc),)
            )
    if isinstance(source, RegistrySource):
        return _report(text, "registry", [source.check(text)], [])
    if isinstance(source, DirectorySource):
        found = entries(source.path)
        notes = [f"{e.name}/: a directory, not checked" for e in found if e.kind == "directory"]
        return _report(text, "directory", [_check_entry(e) for e in found], notes)
    if isinstance(source, Source):  # a DCP directory: checked whole
        return _report(text, "directory", [source.check(text)], [])
    return _report(text, "file", [check_file(source, text)], [])
