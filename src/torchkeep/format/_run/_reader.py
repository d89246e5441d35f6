"""Reading a run: :class:`RunReader` and run references, safe beside a writer.

Readers beside a writer: retention deletes a manifest first, then the packs no remaining manifest
uses, and packs are never rewritten. So a reader that finds a pack (or a manifest) gone checks
whether the manifest it read is still in place, the same file: if it is, the run is damaged; if
not, the checkpoint was pruned while being read. :meth:`RunReader.read` then resolves ``latest``
or ``best`` again (a few times) and otherwise raises :class:`CheckpointPrunedError`, never a
false "damaged". A pack already opened is mapped, and stays readable after it is deleted.

``RUN@best`` needs an order of checkpoints by a metric, and that order is retention policy: it
lives in ``manager/_retention.py`` (``rank_by_metric``), one layer up, which this module may not
import. So the order is given to the reader (``RunReader(root, ranking=...)``,
``load_reference(..., ranking=...)``); callers that give none get the default that
``manager/_retention.py`` registers with :func:`set_default_ranking` when it is imported, which
importing ``torchkeep`` always does. Imports stay downward, and ``RUN@best`` of a reader and the
``"best"`` that retention keeps can never disagree: they are the same function.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from torchkeep.errors import (
    CheckpointNotFoundError,
    CheckpointPrunedError,
    CorruptCheckpointError,
    StorageError,
    TorchkeepError,
)
from torchkeep.format._artifact import SafetensorsFile
from torchkeep.format._confine import lstat_inside
from torchkeep.format._hash import hash_matches
from torchkeep.format._location import MapLocation, cast, relocate
from torchkeep.format._rebuild import rebuild
from torchkeep.format._run._layout import (
    MANIFEST_DIR,
    PACK_DIR,
    RUN_FILE,
    check_layout,
    committed_steps,
    manifest_name,
    parse_reference,
    steps_text,
)
from torchkeep.format._run._manifest import Manifest, bad_manifest, read_manifest, read_run_file
from torchkeep.format._sharded import assemble
from torchkeep.storage import local_path, storage_error

# How many times a reader resolves ``latest``/``best`` again after a prune took its checkpoint.
READ_ATTEMPTS = 4
T = TypeVar("T")
Ranking = Callable[[Iterable[tuple[int, Mapping[str, Any]]], str, str], list[int]]
"""``ranking(checkpoints, monitor, mode)``: the steps of ``(step, metrics)`` pairs, best first."""
_default_ranking: Ranking | None = None


def set_default_ranking(ranking: Ranking) -> None:
    """Make ``ranking`` the order of ``RUN@best`` for readers given none (see the docstring)."""
    global _default_ranking
    _default_ranking = ranking


class RunReader:
    """Read-only view of a run directory: never takes the writer lock, never writes."""

    def __init__(self, root: str | os.PathLike[str], *, ranking: Ranking | None = None) -> None:
        self.root = local_path(root)
        self._ranking = ranking
        if lstat_inside(self.root, RUN_FILE, kind="file") is None:
            raise CheckpointNotFoundError(
                "not a torchkeep run (no torchkeep_run.json)",
                path=str(self.root),
                hint="create it with torchkeep.CheckpointManager(path)",
            )
        doc = read_run_file(self.root)
        check_layout(self.root)
        self.description: dict[str, Any] = doc

    @property
    def policy(self) -> dict[str, Any]:
        policy = self.description.get("policy", {})
        return policy if isinstance(policy, dict) else {}

    def steps(self) -> list[int]:
        """Steps of the committed checkpoints, ascending."""
        return committed_steps(self.root)

    def manifests(self, steps: list[int] | None = None) -> list[Manifest]:
        """Every committed manifest (of ``steps``, by default all); one deleted meanwhile by a
        writer's retention is skipped."""
        found = []
        for step in self.steps() if steps is None else steps:
            try:
                found.append(self.manifest(step))
            except CheckpointNotFoundError:
                continue
        return found

    def manifest(self, step: int) -> Manifest:
        path = self.root / MANIFEST_DIR / manifest_name(step)
        for _ in range(READ_ATTEMPTS):
            try:
                before = self._manifest_stat(step)
            except CorruptCheckpointError as exc:
                if "symbolic link" in exc.message and exc.key == f"{MANIFEST_DIR}/{path.name}":
                    raise bad_manifest(
                        path, "it is a symbolic link; a run's manifests are plain files"
                    ) from exc
                raise
            if before is None:
                raise CheckpointNotFoundError(
                    f"the run has no checkpoint at step {step}",
                    path=str(self.root),
                    hint=f"steps available: {steps_text(self.steps())}",
                )
            try:
                manifest = read_manifest(path)
            except FileNotFoundError:
                continue  # deleted between the two calls: look again
            after = self._manifest_stat(step)
            if after is None or _identity(after) != _identity(before):
                continue  # replaced (the step saved again) while read: read the new one
            if manifest.step != step:
                raise bad_manifest(
                    path, f"it says step {manifest.step} but is named for step {step}"
                )
            return dataclasses.replace(manifest, identity=_identity(before))
        raise CheckpointPrunedError(
            f"the checkpoint at step {step} kept changing while being read",
            path=str(path),
            hint="a writer is saving this step again and again; read it once it has finished",
        )

    def _manifest_stat(self, step: int) -> os.stat_result | None:
        return lstat_inside(self.root, MANIFEST_DIR, manifest_name(step), kind="file")

    def is_current(self, manifest: Manifest) -> bool:
        """Whether the manifest read is still committed in the run, as that same file."""
        try:
            st = self._manifest_stat(manifest.step)
        except CorruptCheckpointError:
            return True  # something is there, and it is damage to report, not a prune
        if st is None:
            return False
        return manifest.identity is None or _identity(st) == manifest.identity

    def pack_path(self, name: str, manifest: Manifest, key: str | None = None) -> Path:
        """The path of pack ``name`` of ``manifest``, checked to be a plain file inside the run.

        Raises:
            CorruptCheckpointError: the pack is missing, or a link, or not a file.
        """
        try:
            st = lstat_inside(self.root, PACK_DIR, name, kind="file")
        except CorruptCheckpointError as exc:
            if "symbolic link" in exc.message and exc.key == f"{PACK_DIR}/{name}":
                raise CorruptCheckpointError(
                    f"pack {name} is a symbolic link; a run's packs are plain files",
                    path=str(manifest.path),
                    key=key,
                    hint="a link could point anywhere on the machine: replace it by the file",
                ) from exc
            raise
        if st is None:
            what = f"pack {name}" + (f" of tensor {key!r}" if key is not None else "")
            raise CorruptCheckpointError(
                f"{what} is missing",
                path=str(manifest.path),
                key=key,
                hint="the run was damaged (a pack deleted by hand?); load another step",
            )
        return self.root / PACK_DIR / name

    def read(self, which: str, use: Callable[[Manifest], T]) -> T:
        """``use(manifest)`` for ``"latest"``, ``"best"`` or a step, settling races with a writer.

        When ``use`` fails and the manifest it was given is no longer in the run, the checkpoint
        was pruned meanwhile, not damaged: ``latest``/``best`` are resolved again, a step is
        answered with :class:`CheckpointPrunedError` (unless it was saved again meanwhile).

        Raises:
            CheckpointPrunedError: the checkpoint was deleted by the writer's retention.
            CorruptCheckpointError: the checkpoint is damaged (its manifest is still there).
        """
        for attempt in range(READ_ATTEMPTS):
            try:
                manifest = self.resolve(which)
            except CheckpointPrunedError:
                raise
            except CheckpointNotFoundError as exc:
                if attempt == 0:
                    raise
                raise self._pruned(which) from exc
            try:
                return use(manifest)
            except (TorchkeepError, OSError) as exc:
                if self.is_current(manifest):
                    if isinstance(exc, OSError) and not isinstance(exc, TorchkeepError):
                        raise _storage_error(exc, manifest) from exc
                    raise
                last = exc  # pruned, or that step saved again: resolve once more
        raise self._pruned(which) from last

    def _pruned(self, which: str) -> CheckpointPrunedError:
        what = f"step {which}" if which.isdigit() else f"the {which} checkpoint"
        return CheckpointPrunedError(
            f"{what} was pruned by the run's writer (retention) while being read",
            path=f"{self.root}@{which}",
            hint="read RUN@latest again, or keep more checkpoints (keep_last) while reading"
            if which.isdigit()
            else "the writer prunes faster than this read; retry, or keep more checkpoints",
        )

    def best(self, manifests: list[Manifest] | None = None) -> Manifest | None:
        """The checkpoint with the best value of the run's monitored metric, if any."""
        monitor, mode = self.policy.get("monitor"), self.policy.get("mode", "min")
        if not monitor:
            return None
        found = manifests if manifests is not None else self.manifests()
        ranked = self._rank()(((m.step, m.metrics) for m in found), monitor, mode)
        return next((m for m in found if m.step == ranked[0]), None) if ranked else None

    def _rank(self) -> Ranking:
        ranking = self._ranking or _default_ranking
        if ranking is None:
            raise TorchkeepError(
                "no ranking of checkpoints to resolve RUN@best with",
                path=f"{self.root}@best",
                hint="import torchkeep (its manager registers the ranking), or pass ranking=",
            )
        return ranking

    def resolve(self, which: str) -> Manifest:
        """The manifest for ``"latest"``, ``"best"`` or a step number."""
        if which.isascii() and which.isdigit() and len(which) <= 19:
            return self.manifest(int(which))
        steps = self.steps()
        if not steps:
            raise CheckpointNotFoundError(
                "the run has no committed checkpoint yet", path=str(self.root)
            )
        if which == "latest":
            for _ in range(READ_ATTEMPTS - 1):
                # Listed, then deleted before it was read (by hand, or a step saved again):
                # list again rather than call the run damaged.
                with contextlib.suppress(CheckpointNotFoundError):
                    return self.manifest(steps[-1])
                steps = self.steps() or steps
            return self.manifest(steps[-1])
        for _ in range(READ_ATTEMPTS - 1):
            # A checkpoint pruned while the run is listed leaves the others, but the best of
            # those may be no checkpoint's "best" at any moment: list again until none vanish.
            manifests = self.manifests(steps)
            if len(manifests) == len(steps):
                break
            steps = self.steps()
        best = self.best(manifests)
        if best is None:
            raise CheckpointNotFoundError(
                "no best checkpoint: the run monitors no metric, or no checkpoint has it",
                path=f"{self.root}@best",
                hint="give the manager monitor='val_loss' (and mode), or use @latest / @<step>",
            )
        return best

    def load(
        self,
        manifest: Manifest,
        *,
        map_location: MapLocation = None,
        dtype: torch.dtype | None = None,
        verify: bool = True,
        shards: bool = True,
    ) -> Any:
        """Rebuild the saved state of a checkpoint (tensors mapped from its packs).

        A sharded checkpoint's models and optimizers come back as full tensors, assembled one
        at a time; ``shards=False`` leaves them out (each rank of a job reads its own).

        With ``verify`` (the default), every tensor's bytes are checked against the hash in the
        manifest (xxh3-128, ~10 GB/s), which reads them; ``verify=False`` keeps them lazy.
        """
        try:
            return self._load(
                manifest, map_location=map_location, dtype=dtype, verify=verify, shards=shards
            )
        except (TorchkeepError, OSError) as exc:
            if self.is_current(manifest):
                if isinstance(exc, OSError) and not isinstance(exc, TorchkeepError):
                    raise _storage_error(exc, manifest) from exc
                raise
            raise self._pruned(str(manifest.step)) from exc

    def _load(
        self,
        manifest: Manifest,
        *,
        map_location: MapLocation,
        dtype: torch.dtype | None,
        verify: bool,
        shards: bool = True,
    ) -> Any:
        packs: dict[str, SafetensorsFile] = {}
        fetched: set[tuple[str, str]] = set()
        source = str(manifest.path)

        def fetch(key: str) -> torch.Tensor:
            ref = manifest.tensors.get(key)
            if ref is None:
                raise CorruptCheckpointError(
                    f"the skeleton refers to tensor {key!r}, which the manifest does not list",
                    path=source,
                    key=key,
                )
            if ref.pack not in packs:
                pack_path = self.pack_path(ref.pack, manifest, key)
                packs[ref.pack] = SafetensorsFile(str(pack_path))  # verified per tensor below
            t = packs[ref.pack].tensor(ref.key)
            if tuple(t.shape) != ref.shape or str(t.dtype).removeprefix("torch.") != ref.dtype:
                raise CorruptCheckpointError(
                    f"tensor {key!r}: the pack holds {t.dtype} {tuple(t.shape)}, "
                    f"the manifest says {ref.dtype} {ref.shape}",
                    path=source,
                    key=key,
                )
            if verify and (ref.pack, ref.key) not in fetched and not hash_matches(t, ref.hash):
                raise CorruptCheckpointError(
                    f"tensor {key!r} does not match its hash: pack {ref.pack} was altered or "
                    "damaged",
                    path=source,
                    key=key,
                    hint="load another checkpoint of the run (RUN@<step>); "
                    "torchkeep verify RUN lists every damaged tensor",
                )
            if (ref.pack, ref.key) in fetched:
                # Equal bytes are stored once, but distinct tensors must not share memory:
                # an in-place update of one (Adam's step += 1) would change the other.
                return t.clone()
            fetched.add((ref.pack, ref.key))
            return t

        state = rebuild(
            manifest.skeleton, fetch, map_location=map_location, dtype=dtype, source=source
        )
        if shards and manifest.sharded is not None and isinstance(state, dict):
            # Saved in shards (FSDP2/DTensor): each full tensor assembled from its chunks.
            # Each chunk is hashed where it lies in its pack, copied into place, and its pages
            # dropped: the peak is the full tensors plus one chunk.
            def move(t: torch.Tensor) -> torch.Tensor:
                return cast(relocate(t, "cpu", map_location, key="", path=source), dtype)

            def release(key: str, chunk: torch.Tensor) -> None:
                packs[manifest.tensors[key].pack].mapped.release(chunk)

            moved = map_location is not None or dtype is not None
            whole = assemble(
                manifest.sharded,
                fetch,
                source=source,
                release=release,
                finish=move if moved else None,
            )
            state.update(whole)
        return state


def _identity(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


def _storage_error(exc: OSError, manifest: Manifest) -> StorageError:
    return storage_error(exc, manifest.path, f"read checkpoint {manifest.step}")


def load_reference(
    text: str | os.PathLike[str],
    loader: Callable[[RunReader, Manifest], Any],
    *,
    ranking: Ranking | None = None,
) -> Any:
    """Resolve a run reference and hand the reader and manifest to ``loader``.

    ``ranking`` orders checkpoints for ``RUN@best``; by default the one registered with
    :func:`set_default_ranking`.
    """
    parsed = parse_reference(text)
    if parsed is None:
        raise CheckpointNotFoundError("not a run reference", path=os.fspath(text))
    reader = RunReader(parsed[0], ranking=ranking)
    return reader.read(parsed[1], lambda manifest: loader(reader, manifest))
