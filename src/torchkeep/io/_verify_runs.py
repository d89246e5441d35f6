"""Verifying a run, or one of its checkpoints, beside a writer that may be pruning it.

Every manifest is checked against its packs (sizes, digests, each tensor's hash) and the
structure must rebuild; a checkpoint pruned while it was read is a note, not damage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torchkeep.errors import CheckpointNotFoundError, TorchkeepError
from torchkeep.format import (
    PACK_DIR,
    Manifest,
    RunReader,
    SafetensorsFile,
    file_hash,
    hash_matches,
    parse_reference,
)
from torchkeep.io._verify_report import VerifyReport
from torchkeep.storage import storage_for


def _check_manifest(run: RunReader, manifest: Manifest, packs: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    for name in sorted(manifest.packs):
        if name in packs or name not in manifest.pack_digests:
            continue
        size, digest = manifest.pack_digests[name]
        try:
            path = run.pack_path(name, manifest)
            actual = storage_for(path).size(str(path))
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


def verify_run(text: str) -> VerifyReport:
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
        listed = storage_for(folder).list(str(folder))
        stray = [n for n in listed if n not in used and not n.startswith(".")]
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
