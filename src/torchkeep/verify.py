"""Checking checkpoints without trusting them: ``verify`` (integrity) and ``scan`` (pickles).

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
==========================  ============================================================== ``scan`` lists the globals a pickle-based file (``.pt``, ``.bin``,
``.ckpt``...) would import, statically, without executing it: a tripwire next to the real gate,
torch's ``weights_only`` unpickler.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchkeep.errors import CheckpointNotFoundError, TorchkeepError
from torchkeep.format import (
    PACK_DIR,
    DirectorySource,
    FileCheck,
    Manifest,
    RunReader,
    RunSource,
    SafetensorsFile,
    check_file,
    file_hash,
    hash_matches,
    locate,
    open_source,
    parse_reference,
)
from torchkeep.format._directory import PICKLE_FORMATS, Entry, entries, side_file_summary
from torchkeep.format._pickle_scan import PickleScan, scan_file

__all__ = ["DirectoryScan", "FileCheck", "PickleScan", "VerifyReport", "scan", "verify"]


@dataclass(frozen=True, kw_only=True, slots=True)
class VerifyReport:
    """The outcome of :func:`verify`.

    Attributes:
        target: what was checked.
        kind: ``"run"``, ``"checkpoint"`` (one of a run), ``"file"`` or ``"directory"`` (a
            checkpoint directory such as a Trainer ``checkpoint-N/``).
        checkpoints: how many checkpoints (checkpoint files, for a directory) were checked.
        tensors: how many tensors were read and checked.
        problems: every problem found, one line each (empty when all is well).
        notes: observations that are not problems (e.g. packs left by a crashed save).
        hashed: tensors whose bytes matched a stored hash or checksum.
        structural: tensors checked for structure only (their format stores no checksum).
        damaged: tensors whose bytes failed their check.
        files: what was checked in each file (files and directories; empty for runs).
    """

    target: str
    kind: str
    checkpoints: int
    tensors: int
    problems: tuple[str, ...]
    notes: tuple[str, ...] = ()
    hashed: int = 0
    structural: int = 0
    damaged: int = 0
    files: tuple[FileCheck, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "kind": self.kind,
            "ok": self.ok,
            "checkpoints": self.checkpoints,
            "tensors": self.tensors,
            "hashed": self.hashed,
            "structural": self.structural,
            "damaged": self.damaged,
            "problems": list(self.problems),
            "notes": list(self.notes),
            "files": [f.to_dict() for f in self.files],
        }


def _check_manifest(run: RunReader, manifest: Manifest, packs: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    for name in sorted(manifest.packs):
        if name in packs or name not in manifest.pack_digests:
            continue
        size, digest = manifest.pack_digests[name]
        try:
            path = run.pack_path(name, manifest)
            actual = path.stat().st_size
            if actual != size:
                problems.append(
                    f"step {manifest.step}: pack {name} has {actual} bytes, the manifest says {size}"
                )
            elif file_hash(path) != digest:
                problems.append(f"step {manifest.step}: pack {name} does not match its hash")
        except TorchkeepError as exc:
            problems.append(f"step {manifest.step}: {exc.message}")
        except OSError as exc:
            problems.append(f"step {manifest.step}: pack {name} unreadable ({exc})")
    for key, ref in manifest.tensors.items():
        where = f"step {manifest.step}, tensor {key!r}"
        if ref.pack not in packs:
            try:
                packs[ref.pack] = SafetensorsFile(str(run.pack_path(ref.pack, manifest, key)))
            except (TorchkeepError, OSError) as exc:
                # Not cached: a pack gone with a pruned checkpoint must not fail the others.
                message = exc.message if isinstance(exc, TorchkeepError) else str(exc)
                problems.append(f"{where}: pack {ref.pack} unreadable ({message})")
                continue
        try:
            t = packs[ref.pack].tensor(ref.key)
        except TorchkeepError as exc:
            problems.append(f"{where}: {exc.message}")
            continue
        if not hash_matches(t, ref.hash):
            problems.append(f"{where}: bytes do not match the hash (pack {ref.pack})")
    try:  # the structure must rebuild too (skeleton, views)
        run.load(manifest, verify=False)
    except TorchkeepError as exc:
        problems.append(f"step {manifest.step}: {exc.message}")
    return problems


class _Damaged(TorchkeepError):
    """The problems found in one checkpoint, raised so that ``RunReader.read`` can tell a
    checkpoint pruned meanwhile (resolve again) from a damaged one (report)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def _verify_run(text: str) -> VerifyReport:
    """Verify a run or one of its checkpoints, beside a writer that may be pruning it.

    A checkpoint whose manifest disappears while it is checked was pruned by the writer: it is
    named in the notes, not reported as damage (``RunReader.read`` explains how that is told).
    """
    parsed = parse_reference(text)
    assert parsed is not None
    run = RunReader(parsed[0])
    single = parsed[0] != Path(text)  # RUN@<which>, not the run directory itself
    problems: list[str] = []
    notes: list[str] = []
    packs: dict[str, Any] = {}
    used: set[str] = set()
    count = checked = 0
    if single:

        def check(manifest: Manifest) -> Manifest:
            found = _check_manifest(run, manifest, {})
            if found:
                raise _Damaged(found)
            return manifest

        try:
            manifest = run.read(parsed[1], check)
            checked, count = 1, len(manifest.tensors)
        except _Damaged as exc:
            problems += exc.problems
            checked = 1
    pruned: list[int] = []
    for step in [] if single else run.steps():
        try:
            manifest = run.manifest(step)
        except CheckpointNotFoundError:
            pruned.append(step)  # listed, then deleted: the writer's retention
            continue
        except TorchkeepError as exc:
            problems.append(f"step {step}: {exc.message}")
            checked += 1
            continue
        found = _check_manifest(run, manifest, packs)
        if found and not run.is_current(manifest):
            pruned.append(step)
            continue
        used |= manifest.packs
        count += len(manifest.tensors)
        checked += 1
        problems += found
    if pruned:
        notes.append(
            f"{len(pruned)} checkpoint(s) pruned by the run's writer while verify ran, "
            f"not checked: step(s) {', '.join(map(str, pruned[:10]))}"
        )
    folder = run.root / PACK_DIR
    if not single and not pruned and folder.is_dir():
        stray = sorted(
            p.name for p in folder.iterdir() if p.name not in used and not p.name.startswith(".")
        )
        if stray:
            notes.append(
                f"{len(stray)} pack(s) no checkpoint uses (left by an interrupted save, or being "
                f"written now; the next writer removes them): {', '.join(stray[:5])}"
            )
    damaged = sum(", tensor " in p for p in problems)  # "step 3, tensor 'w': ..."
    return VerifyReport(
        target=text,
        kind="checkpoint" if single else "run",
        checkpoints=checked,
        tensors=count,
        problems=tuple(problems),
        notes=tuple(notes),
        hashed=max(count - damaged, 0),
        damaged=damaged,
    )


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


def verify(target: str | os.PathLike[str]) -> VerifyReport:
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
    text = os.fspath(target)
    parse_reference(text)  # an unknown selector (RUN@bset) raises, naming the valid ones
    try:
        source = locate(text)
    except TorchkeepError as exc:
        return VerifyReport(
            target=text, kind="file", checkpoints=0, tensors=0, problems=(str(exc),)
        )
    if isinstance(source, RunSource):
        try:
            return _verify_run(text)
        except TorchkeepError as exc:
            return VerifyReport(
                target=text, kind="run", checkpoints=0, tensors=0, problems=(str(exc),)
            )
    if isinstance(source, DirectorySource):
        found = entries(source.path)
        notes = [f"{e.name}/: a directory, not checked" for e in found if e.kind == "directory"]
        return _report(text, "directory", [_check_entry(e) for e in found], notes)
    return _report(text, "file", [check_file(source, text)], [])


@dataclass(frozen=True, kw_only=True, slots=True)
class DirectoryScan:
    """What :func:`scan` found in a checkpoint directory: one :class:`PickleScan` per file.

    It answers like a :class:`PickleScan` (``globals``, ``unsafe``, ``is_safe``) for the
    directory as a whole, and names the files at fault.

    Attributes:
        path: the directory.
        files: the scan of every checkpoint file (safetensors files have no pickle records).
        damaged: ``(file, problem)`` for each checkpoint file that could not be parsed.
        skipped: files that are not checkpoints (JSON side files...), not scanned.
    """

    path: str
    files: tuple[PickleScan, ...]
    damaged: tuple[tuple[str, str], ...] = ()
    skipped: tuple[str, ...] = ()

    @property
    def records(self) -> tuple[str, ...]:
        return tuple(f"{Path(s.path).name}:{r}" for s in self.files for r in s.records)

    @property
    def globals(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(g for s in self.files for g in s.globals))

    @property
    def unsafe(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(g for s in self.files for g in s.unsafe))

    @property
    def unsafe_files(self) -> tuple[str, ...]:
        """The names of the files that would import a refused global."""
        return tuple(Path(s.path).name for s in self.files if not s.is_safe)

    @property
    def is_safe(self) -> bool:
        """No file imports a refused global, and every checkpoint file could be parsed."""
        return not self.unsafe and not self.damaged

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "is_safe": self.is_safe,
            "unsafe_files": list(self.unsafe_files),
            "damaged": [{"file": f, "problem": p} for f, p in self.damaged],
            "skipped": list(self.skipped),
            "globals": list(self.globals),
            "unsafe": list(self.unsafe),
            "files": [s.to_dict() for s in self.files],
        }


def _scan_directory(directory: Path) -> DirectoryScan:
    scans: list[PickleScan] = []
    damaged: list[tuple[str, str]] = []
    skipped: list[str] = []
    for e in entries(directory):
        if e.kind != "checkpoint":
            skipped.append(e.name)
        elif e.error is not None:
            damaged.append((e.name, e.error.message))
        elif e.format not in PICKLE_FORMATS:
            scans.append(PickleScan(path=str(e.path), records=(), globals=(), unsafe=()))
        else:
            try:
                scans.append(scan_file(e.path))
            except TorchkeepError as exc:
                damaged.append((e.name, exc.message))
    return DirectoryScan(
        path=str(directory), files=tuple(scans), damaged=tuple(damaged), skipped=tuple(skipped)
    )


def scan(path: str | os.PathLike[str]) -> PickleScan | DirectoryScan:
    """List the globals a pickle-based checkpoint would import, without executing anything.

    Safetensors files hold no pickle: their scan is empty and safe. A checkpoint directory (a
    Trainer ``checkpoint-N/``, Accelerate state) has every checkpoint file scanned: its
    :class:`DirectoryScan` is unsafe when any file is, and names them (``unsafe_files``).

    Raises:
        CheckpointNotFoundError, CorruptCheckpointError: nothing, or no checkpoint, at ``path``.
    """
    source = open_source(path)
    if isinstance(source, DirectorySource):
        return _scan_directory(source.path)
    return source.scan()
