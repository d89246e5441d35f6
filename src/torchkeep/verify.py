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
    WEIGHTS_FILE,
    Format,
    Manifest,
    RunReader,
    SafetensorsFile,
    describe,
    detect,
    file_hash,
    hash_matches,
    load_file,
    parse_reference,
    resolve_path,
    tensor_hash,
    tensors_by_path,
)
from torchkeep.format._directory import (
    PICKLE_FORMATS,
    Entry,
    entries,
    is_checkpoint_dir,
    side_file_summary,
    unsafe_summary,
)
from torchkeep.format._pickle_scan import PickleScan, scan_file
from torchkeep.format._reader import _shard_files as shard_files
from torchkeep.format._torchfile import (
    damaged_members,
    damaged_records,
    damaged_tensors,
    is_hashed,
    load_torch,
    read_document,
)

__all__ = ["DirectoryScan", "FileCheck", "PickleScan", "VerifyReport", "scan", "verify"]


#: How a file's tensor bytes were checked: against xxh3-128 hashes torchkeep recorded, against
#: the CRC-32 a zip archive records for every member, or not at all (structure only).
CHECKS = ("xxh3_128", "crc32", None)


@dataclass(frozen=True, kw_only=True, slots=True)
class FileCheck:
    """What :func:`verify` checked in one file.

    Attributes:
        path: the file (its name, inside a checkpoint directory).
        format: the format detected from its bytes; ``"json"`` for a side file.
        status: ``"ok"``, ``"damaged"``, ``"unsafe"`` (a pickle torchkeep will not load),
            ``"side-file"`` (JSON beside the checkpoint, parsed) or ``"skipped"`` (not a
            checkpoint: listed, not checked).
        check: how tensor bytes were checked: ``"xxh3_128"`` (hashes torchkeep recorded),
            ``"crc32"`` (the zip's checksums of a torch file from elsewhere) or ``None``.
        tensors: stored tensors read.
        hashed: tensors whose bytes matched a stored hash (or CRC-32, see ``check``).
        structural: tensors checked for structure only (dtype, shape, bounds): the format stores
            no checksum for them (plain safetensors, legacy torch files).
        damaged: tensors (or, for ``crc32``, storage members) whose bytes failed their check.
        problems: every problem found in the file.
    """

    path: str
    format: str | None
    status: str
    check: str | None = None
    tensors: int = 0
    hashed: int = 0
    structural: int = 0
    damaged: int = 0
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "side-file", "skipped")

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "status": self.status,
            "ok": self.ok,
            "check": self.check,
            "tensors": self.tensors,
            "hashed": self.hashed,
            "structural": self.structural,
            "damaged": self.damaged,
            "problems": list(self.problems),
        }


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


def _damaged(shown: str, fmt: str | None, *problems: str) -> FileCheck:
    return FileCheck(path=shown, format=fmt, status="damaged", problems=problems)


def _check_safetensors(p: Path, shown: str) -> FileCheck:
    try:
        st = SafetensorsFile(str(p))
        hashes = st.hashes
        bad = st.damaged()
    except TorchkeepError as exc:
        return _damaged(shown, Format.SAFETENSORS.value, exc.message)
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


def _check_torch(p: Path, shown: str, fmt: Format) -> FileCheck:
    path, is_zip = str(p), fmt is Format.TORCH_ZIP
    try:
        found = scan_file(p)
        doc = read_document(path) if is_zip else None
    except TorchkeepError as exc:
        return _damaged(shown, fmt.value, exc.message)
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
        return _damaged(shown, fmt.value, *problems, exc.message)
    check: str | None
    if doc is not None and hashed_file:
        good, bad = damaged_tensors(obj, doc, path=path)
        problems += bad
        stored, hashed, damaged, check = good + len(bad), good, len(bad), "xxh3_128"
    else:
        stored = _stored_tensors(obj)
        damaged = sum("/data/" in x for x in problems)  # storage members failing their CRC
        hashed = max(stored - damaged, 0) if is_zip else 0
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
        damaged=damaged,
        problems=tuple(problems),
    )


def _check_archive(p: Path, shown: str, fmt: Format) -> FileCheck:
    """A TorchScript or torch.export archive: a program; its zip checksums are what we check."""
    problems = damaged_members(str(p))
    return FileCheck(
        path=shown,
        format=fmt.value,
        status="damaged" if problems else "ok",
        check="crc32",
        problems=tuple(problems),
    )


def _check_sharded(index: Path, shown: str) -> FileCheck:
    """A Hugging Face sharded checkpoint: every shard, then the index against the shards."""
    try:
        weight_map, _ = shard_files(index)
    except TorchkeepError as exc:
        return _damaged(shown, Format.HF_SHARDED.value, exc.message)
    parts: list[FileCheck] = []
    problems: list[str] = []
    for name in dict.fromkeys(weight_map.values()):
        if (index.parent / name).is_file():
            parts.append(_check_file(index.parent / name, name))
        else:
            problems.append(f"shard {name} listed in the index is missing")
    problems += [f"{c.path}: {x}" for c in parts for x in c.problems]
    if not problems:
        try:
            load_file(index, verify=False)  # every indexed tensor is in its shard
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


def _check_file(p: Path, shown: str) -> FileCheck:
    """Verify one checkpoint file of any format (or a save_model directory), every problem."""
    try:
        fmt = detect(p)
    except TorchkeepError as exc:
        return _damaged(shown, None, exc.message)
    except OSError as exc:
        return _damaged(shown, None, f"cannot read the file: {exc}")
    if fmt is Format.MODEL_DIR:
        return _check_safetensors(p / WEIGHTS_FILE, shown)
    if fmt is Format.SAFETENSORS:
        return _check_safetensors(p, shown)
    if fmt in (Format.TORCH_ZIP, Format.TORCH_LEGACY):
        return _check_torch(p, shown, fmt)
    if fmt is Format.HF_SHARDED:
        return _check_sharded(p, shown)
    return _check_archive(p, shown, fmt)  # TorchScript, torch.export: programs in a zip


def _check_entry(e: Entry) -> FileCheck:
    if e.kind == "side-file":
        _, problem = side_file_summary(e.path)
        if problem:
            return _damaged(e.name, "json", problem)
        return FileCheck(path=e.name, format="json", status="side-file")
    if e.kind != "checkpoint":
        return FileCheck(path=e.name, format=None, status="skipped")
    if e.error is not None:
        return _damaged(e.name, None, e.error.message)
    return _check_file(e.path, e.name)


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
    if parse_reference(text) is not None:
        try:
            return _verify_run(text)
        except TorchkeepError as exc:
            return VerifyReport(
                target=text, kind="run", checkpoints=0, tensors=0, problems=(str(exc),)
            )
    if is_checkpoint_dir(text):
        found = entries(Path(text))
        notes = [f"{e.name}/: a directory, not checked" for e in found if e.kind == "directory"]
        return _report(text, "directory", [_check_entry(e) for e in found], notes)
    try:
        p = resolve_path(text)
    except TorchkeepError as exc:
        return VerifyReport(
            target=text, kind="file", checkpoints=0, tensors=0, problems=(str(exc),)
        )
    return _report(text, "file", [_check_file(p, text)], [])


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
    if is_checkpoint_dir(path):
        return _scan_directory(Path(path))
    p = resolve_path(path)
    if not p.is_dir() and detect(Path(p)) in (Format.SAFETENSORS, Format.HF_SHARDED):
        return PickleScan(path=str(p), records=(), globals=(), unsafe=())
    return scan_file(p)
