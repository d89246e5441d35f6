"""Checking checkpoints without trusting them: ``verify`` (integrity) and ``scan`` (pickles).

``verify`` reads a file, one checkpoint of a run, or a whole run, checks its structure and every
tensor's bytes against the hash its manifest recorded, and reports every problem it finds rather
than stopping at the first. ``scan`` lists the globals a pickle-based file (``.pt``, ``.bin``,
``.ckpt``...) would import, statically, without executing it: a tripwire next to the real gate,
torch's ``weights_only`` unpickler.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchkeep.errors import TorchkeepError
from torchkeep.format import (
    PACK_DIR,
    Format,
    Manifest,
    RunReader,
    SafetensorsFile,
    detect,
    file_hash,
    hash_matches,
    load_file,
    parse_reference,
    resolve_path,
    tensor_hash,
    tensors_by_path,
)
from torchkeep.format._pickle_scan import PickleScan, scan_file

__all__ = ["PickleScan", "VerifyReport", "scan", "verify"]


@dataclass(frozen=True, kw_only=True, slots=True)
class VerifyReport:
    """The outcome of :func:`verify`.

    Attributes:
        target: what was checked.
        kind: ``"run"``, ``"checkpoint"`` (one of a run) or ``"file"``.
        checkpoints: how many checkpoints were checked.
        tensors: how many tensors were read and checked.
        problems: every problem found, one line each (empty when all is well).
        notes: observations that are not problems (e.g. packs left by a crashed save).
    """

    target: str
    kind: str
    checkpoints: int
    tensors: int
    problems: tuple[str, ...]
    notes: tuple[str, ...] = ()

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
            "problems": list(self.problems),
            "notes": list(self.notes),
        }


def _check_manifest(run: RunReader, manifest: Manifest, packs: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    for name in sorted(manifest.packs):
        if name in packs or name not in manifest.pack_digests:
            continue
        path = run.root / PACK_DIR / name
        size, digest = manifest.pack_digests[name]
        if not path.is_file():
            problems.append(f"step {manifest.step}: pack {name} is missing")
        elif path.stat().st_size != size:
            problems.append(
                f"step {manifest.step}: pack {name} has {path.stat().st_size} bytes, "
                f"the manifest says {size}"
            )
        elif file_hash(path) != digest:
            problems.append(f"step {manifest.step}: pack {name} does not match its hash")
    for key, ref in manifest.tensors.items():
        where = f"step {manifest.step}, tensor {key!r}"
        if ref.pack not in packs:
            try:
                packs[ref.pack] = SafetensorsFile(str(run.root / PACK_DIR / ref.pack))
            except (TorchkeepError, OSError) as exc:
                packs[ref.pack] = exc
        pack = packs[ref.pack]
        if isinstance(pack, BaseException):
            problems.append(f"{where}: pack {ref.pack} unreadable ({pack})")
            continue
        try:
            t = pack.tensor(ref.key)
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


def _verify_run(text: str) -> VerifyReport:
    parsed = parse_reference(text)
    assert parsed is not None
    run = RunReader(parsed[0])
    single = parsed[0] != Path(text)  # RUN@<which>, not the run directory itself
    steps = [run.resolve(parsed[1]).step] if single else run.steps()
    problems: list[str] = []
    packs: dict[str, Any] = {}
    used: set[str] = set()
    count = 0
    for step in steps:
        try:
            manifest = run.manifest(step)
        except TorchkeepError as exc:
            problems.append(f"step {step}: {exc.message}")
            continue
        used |= manifest.packs
        count += len(manifest.tensors)
        problems += _check_manifest(run, manifest, packs)
    notes: list[str] = []
    folder = run.root / PACK_DIR
    if not single and folder.is_dir():
        stray = sorted(p.name for p in folder.iterdir() if p.name not in used)
        if stray:
            notes.append(
                f"{len(stray)} pack(s) no checkpoint uses (left by an interrupted save; the next "
                f"writer removes them): {', '.join(stray[:5])}"
            )
    return VerifyReport(
        target=text,
        kind="checkpoint" if single else "run",
        checkpoints=len(steps),
        tensors=count,
        problems=tuple(problems),
        notes=tuple(notes),
    )


def verify(target: str | os.PathLike[str]) -> VerifyReport:
    """Check a file, a run checkpoint (``RUN@<step>``) or a whole run, reading every tensor.

    Run checkpoints are checked against the hashes in their manifests; single files are checked
    for structure (header bounds, dtypes and sizes, the skeleton) with every tensor read.

    Returns:
        A :class:`VerifyReport`; ``report.ok`` is False when anything is wrong.
    """
    text = os.fspath(target)
    is_reference = parse_reference(text) is not None
    try:
        if is_reference:
            return _verify_run(text)
        tensors = tensors_by_path(load_file(text))
        for t in tensors.values():
            tensor_hash(t)  # reads every byte
    except TorchkeepError as exc:
        kind = "run" if is_reference else "file"
        return VerifyReport(target=text, kind=kind, checkpoints=0, tensors=0, problems=(str(exc),))
    return VerifyReport(target=text, kind="file", checkpoints=1, tensors=len(tensors), problems=())


def scan(path: str | os.PathLike[str]) -> PickleScan:
    """List the globals a pickle-based checkpoint would import, without executing anything.

    Safetensors files hold no pickle: their scan is empty and safe.

    Raises:
        CheckpointNotFoundError, CorruptCheckpointError: nothing, or no checkpoint, at ``path``.
    """
    p = resolve_path(path)
    if not p.is_dir() and detect(Path(p)) in (Format.SAFETENSORS, Format.HF_SHARDED):
        return PickleScan(path=str(p), records=(), globals=(), unsafe=())
    return scan_file(p)
