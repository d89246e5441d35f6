"""The on-disk layout of a run of checkpoints, and reading it.

::

    RUN/
      torchkeep_run.json            the run: format version and retention policy
      checkpoints/0000000042.json   one manifest per committed checkpoint (step 42)
      packs/<step>-<rand>.safetensors   immutable tensor packs (torchkeep safetensors files)
      metrics.jsonl                 every metrics record ever saved, one JSON object a line
      .lock                         held (flock) by the one writer

A manifest lists every tensor of its checkpoint as (pack, key, dtype, shape, nbytes, hash) next to
the JSON skeleton of the saved state, its metrics and metadata, and, under ``"models"``, how to
rebuild each model of the app whose constructor arguments are known: ``{app_key: {"class":
"pkg.mod:Name", "config": <skeleton of the keyword arguments>}}`` (absent when there is none).
A checkpoint is committed when its manifest is renamed into ``checkpoints/``, after its packs were
fsynced: that rename is the single commit point. Readers trust only committed manifests; a pack
that no manifest names is garbage left by a crash, and the next writer sweeps it (only a file
with a pack's name whose header says ``"kind": "torchkeep-pack"``: a name is no proof). A tensor
whose bytes are already stored in the run is referenced again, not rewritten, so several
manifests may share a pack.

Nothing below the run's root may be a symbolic link (``_confine.py``): a run never reads, writes
or deletes outside itself.

Readers beside a writer: retention deletes a manifest first, then the packs no remaining manifest
uses, and packs are never rewritten. So a reader that finds a pack (or a manifest) gone checks
whether the manifest it read is still in place, the same file: if it is, the run is damaged; if
not, the checkpoint was pruned while being read. :meth:`RunReader.read` then resolves ``latest``
or ``best`` again (a few times) and otherwise raises :class:`CheckpointPrunedError`, never a
false "damaged". A pack already opened is mapped, and stays readable after it is deleted.

References: ``RUN@latest``, ``RUN@best``, ``RUN@<step>``, or ``RUN`` alone (the latest).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
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
from torchkeep.format._artifact import SafetensorsFile, check_format_version, rebuild
from torchkeep.format._confine import lstat_inside
from torchkeep.format._dtypes import shape_numel, tensor_dtype_from_name
from torchkeep.format._hash import hash_matches, seal_ok
from torchkeep.format._location import MapLocation
from torchkeep.format._safetensors import JSON_LIMIT, parse_json
from torchkeep.storage import local_path

RUN_FILE = "torchkeep_run.json"
MANIFEST_DIR = "checkpoints"
PACK_DIR = "packs"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".lock"
# ASCII digits, at most 19 (an int64 step): \d alone also matches "٤" and runs int() refuses
_MANIFEST_NAME = re.compile(r"^([0-9]{10,19})\.json$", re.ASCII)
_REFERENCE = re.compile(r"^(?P<run>.+)@(?P<which>latest|best|[0-9]{1,19})$", re.ASCII)
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# How many times a reader resolves ``latest``/``best`` again after a prune took its checkpoint.
READ_ATTEMPTS = 4
T = TypeVar("T")


def manifest_name(step: int) -> str:
    return f"{step:010d}.json"


def is_run(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a run directory."""
    return (Path(path) / RUN_FILE).is_file()


def check_layout(root: Path) -> None:
    """Refuse a run whose own files or folders are symbolic links (or of the wrong kind).

    Raises:
        CorruptCheckpointError: naming the entry, e.g. ``packs is a symbolic link``.
    """
    for name in (MANIFEST_DIR, PACK_DIR):
        lstat_inside(root, name, kind="dir")
    for name in (RUN_FILE, METRICS_FILE, LOCK_FILE):
        lstat_inside(root, name, kind="file")


def parse_reference(text: str | os.PathLike[str]) -> tuple[Path, str] | None:
    """``"runs/x@best"`` -> ``(Path("runs/x"), "best")``; a bare run directory means its latest.

    Returns ``None`` when ``text`` is no run reference (an ordinary file path).
    """
    local_path(text)  # a URL is refused before any part of it is taken for a local file
    text = os.fspath(text)
    match = _REFERENCE.match(text)
    if match and is_run(match["run"]):
        return Path(match["run"]), match["which"]
    if is_run(text):
        return Path(text), "latest"
    run, at, which = text.rpartition("@")
    if at and run and is_run(run):
        # `RUN@bset` would otherwise be looked up as a file named "RUN@bset": not found.
        raise CheckpointNotFoundError(
            f"unknown selector {which!r} in run reference {text!r}",
            path=text,
            expected=["latest", "best", "<step>"],
            actual=which,
            hint="use RUN@latest, RUN@best or RUN@<step>; steps in this run: "
            f"{_steps_text(RunReader(run).steps())}",
        )
    return None


@dataclass(frozen=True, kw_only=True, slots=True)
class TensorRef:
    """Where one tensor of a checkpoint is stored."""

    pack: str
    key: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    hash: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Manifest:
    """A committed checkpoint: what it holds and where its tensors are."""

    path: Path
    step: int
    time: float
    metrics: dict[str, Any]
    metadata: dict[str, Any]
    skeleton: Any
    tensors: dict[str, TensorRef]
    pack_digests: dict[str, tuple[int, str]] = field(default_factory=dict)
    models: dict[str, Any] = field(default_factory=dict)
    """``{app_key: {"class": "pkg.mod:Name", "config": skeleton}}`` for each rebuildable model."""
    identity: tuple[int, int] | None = None
    """``(st_dev, st_ino)`` of the manifest file read, to tell later whether it is still there."""

    @property
    def packs(self) -> set[str]:
        return {t.pack for t in self.tensors.values()}

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data this checkpoint refers to (shared bytes counted)."""
        return sum(t.nbytes for t in self.tensors.values())


def _bad(path: Path, what: str, key: str | None = None) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"invalid manifest: {what}",
        path=str(path),
        key=key,
        hint="the manifest was altered or written by an incompatible tool; "
        "delete it to drop this checkpoint, or restore it from a copy",
    )


def read_manifest(path: Path) -> Manifest:
    """Parse and validate a manifest; pack names may not point outside the run.

    A manifest ends with a digest of its own bytes, so that any changed byte is detected, even
    one that leaves valid JSON (a digit of a metric, a pack name).
    """
    if path.stat().st_size > JSON_LIMIT:  # refused before it is read into memory
        raise _bad(path, f"{path.stat().st_size} bytes, over the {JSON_LIMIT}-byte limit")
    data = path.read_bytes()
    doc = parse_json(data, what="manifest", path=str(path))
    if not isinstance(doc, dict):
        raise _bad(path, "not a JSON object")
    check_format_version(doc.get("format_version"), path=str(path))
    if not seal_ok(data):
        raise _bad(path, "its bytes do not match its digest (altered or damaged)")
    step, tensors = doc.get("step"), doc.get("tensors")
    if type(step) is not int or step < 0:
        raise _bad(path, f"step {step!r} is not a non-negative integer")
    if not isinstance(tensors, dict) or "skeleton" not in doc:
        raise _bad(path, "no tensor table or skeleton")
    metrics, metadata = doc.get("metrics", {}), doc.get("metadata", {})
    if not isinstance(metrics, dict) or not isinstance(metadata, dict):
        raise _bad(path, "metrics and metadata must be objects")
    refs: dict[str, TensorRef] = {}
    for key, ref in tensors.items():
        try:
            pack, shape, nbytes = ref["pack"], tuple(ref["shape"]), ref["nbytes"]
            if not _is_count(nbytes):
                raise ValueError(f"nbytes {str(nbytes)[:40]} is not a byte count")
            dtype = tensor_dtype_from_name(ref["dtype"], path=str(path), key=str(key))
            item = TensorRef(
                pack=pack,
                key=str(ref["key"]),
                dtype=ref["dtype"],
                shape=shape,
                nbytes=nbytes,
                hash=str(ref["hash"]),
            )
        except CorruptCheckpointError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise _bad(path, f"tensor entry {key!r} is malformed ({exc})", key) from exc
        if not (isinstance(pack, str) and _PLAIN_NAME.match(pack) and len(pack) <= 200) or (
            Path(pack).name != pack
        ):  # a name beyond 255 bytes makes every filesystem call raise OSError
            raise _bad(path, f"tensor {key!r} names pack {pack!r} outside the run", key)
        numel = shape_numel(shape)
        if numel is None or numel * dtype.itemsize != item.nbytes:
            raise _bad(path, f"tensor {key!r}: shape and dtype disagree with nbytes", key)
        refs[key] = item
    time = doc.get("time", 0.0)
    if type(time) not in (int, float) or not math.isfinite(_as_float(time)):
        raise _bad(path, f"time {str(time)[:40]} is not a number")
    return Manifest(
        path=path,
        step=step,
        time=float(time),
        metrics=metrics,
        metadata=metadata,
        skeleton=doc["skeleton"],
        tensors=refs,
        pack_digests=_pack_digests(doc.get("packs", {}), path),
        models=_models(doc.get("models", {}), path),
    )


def _models(models: Any, path: Path) -> dict[str, Any]:
    """The model descriptions: each an object naming its class (the config is checked on use)."""
    if not isinstance(models, dict):
        raise _bad(path, "models must be an object")
    for key, description in models.items():
        if not (isinstance(description, dict) and isinstance(description.get("class"), str)):
            raise _bad(path, f"model entry {key!r} names no class", key)
    return models


def _pack_digests(packs: Any, path: Path) -> dict[str, tuple[int, str]]:
    """The size and whole-file hash of each pack, as the manifest records them."""
    if not isinstance(packs, dict):
        raise _bad(path, "packs must be an object")
    out: dict[str, tuple[int, str]] = {}
    for name, info in packs.items():
        if not (
            isinstance(info, dict)
            and _is_count(info.get("bytes"))
            and isinstance(info.get("hash"), str)
        ):
            raise _bad(path, f"pack entry {name!r} is malformed")
        out[name] = (info["bytes"], info["hash"])
    return out


def _is_count(x: Any) -> bool:
    return type(x) is int and x >= 0


def _as_float(x: int | float) -> float:
    """``float(x)``, or NaN for an int beyond a float's range (a crafted 400-digit metric)."""
    try:
        return float(x)
    except OverflowError:
        return math.nan


class RunReader:
    """Read-only view of a run directory: never takes the writer lock, never writes."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = local_path(root)
        if lstat_inside(self.root, RUN_FILE, kind="file") is None:
            raise CheckpointNotFoundError(
                "not a torchkeep run (no torchkeep_run.json)",
                path=str(self.root),
                hint="create it with torchkeep.CheckpointManager(path)",
            )
        doc = parse_json(
            (self.root / RUN_FILE).read_bytes(), what="run description", path=str(self.root)
        )
        if not isinstance(doc, dict):
            raise CorruptCheckpointError(f"{RUN_FILE} is not a JSON object", path=str(self.root))
        check_format_version(doc.get("format_version"), path=str(self.root / RUN_FILE))
        check_layout(self.root)
        self.description: dict[str, Any] = doc

    @property
    def policy(self) -> dict[str, Any]:
        policy = self.description.get("policy", {})
        return policy if isinstance(policy, dict) else {}

    def steps(self) -> list[int]:
        """Steps of the committed checkpoints, ascending."""
        if lstat_inside(self.root, MANIFEST_DIR, kind="dir") is None:
            return []
        try:
            names = os.listdir(self.root / MANIFEST_DIR)
        except FileNotFoundError:
            return []
        found = (_MANIFEST_NAME.match(name) for name in names)
        return sorted(int(m[1]) for m in found if m)

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
                    raise _bad(
                        path, "it is a symbolic link; a run's manifests are plain files"
                    ) from exc
                raise
            if before is None:
                raise CheckpointNotFoundError(
                    f"the run has no checkpoint at step {step}",
                    path=str(self.root),
                    hint=f"steps available: {_steps_text(self.steps())}",
                )
            try:
                manifest = read_manifest(path)
            except FileNotFoundError:
                continue  # deleted between the two calls: look again
            after = self._manifest_stat(step)
            if after is None or _identity(after) != _identity(before):
                continue  # replaced (the step saved again) while read: read the new one
            if manifest.step != step:
                raise _bad(path, f"it says step {manifest.step} but is named for step {step}")
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
        return best_of(manifests if manifests is not None else self.manifests(), monitor, mode)

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
    ) -> Any:
        """Rebuild the saved state of a checkpoint (tensors mapped from its packs).

        With ``verify`` (the default), every tensor's bytes are checked against the hash in the
        manifest (xxh3-128, ~10 GB/s), which reads them; ``verify=False`` keeps them lazy.
        """
        try:
            return self._load(manifest, map_location=map_location, dtype=dtype, verify=verify)
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

        return rebuild(
            manifest.skeleton, fetch, map_location=map_location, dtype=dtype, source=source
        )


def rank_by_metric(
    checkpoints: Iterable[tuple[int, Mapping[str, Any]]], monitor: str, mode: str
) -> list[int]:
    """Steps ordered best first by ``metrics[monitor]`` (``mode`` "min" or "max").

    Checkpoints without a numeric value (missing, bool, NaN) are left out. Ties go to the later
    step: it holds the most training. ``RUN@best`` and retention both rank with this.
    """
    scored = []
    for step, metrics in checkpoints:
        value = metrics.get(monitor)
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = _as_float(value)
            if not math.isnan(number):
                scored.append((number, step))
    sign = 1.0 if mode == "min" else -1.0
    return [step for _, step in sorted(scored, key=lambda s: (sign * s[0], -s[1]))]


def best_of(manifests: list[Manifest], monitor: str, mode: str) -> Manifest | None:
    """The manifest whose ``metrics[monitor]`` is best (``mode`` "min" or "max"); NaN never wins."""
    ranked = rank_by_metric(((m.step, m.metrics) for m in manifests), monitor, mode)
    return next((m for m in manifests if m.step == ranked[0]), None) if ranked else None


def _identity(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


def _storage_error(exc: OSError, manifest: Manifest) -> StorageError:
    err = StorageError(
        f"could not read checkpoint {manifest.step}: {exc.strerror or exc}",
        path=str(manifest.path),
        hint="check that the run's files are readable and the disk healthy",
    )
    err.errno = exc.errno
    return err


def _steps_text(steps: list[int]) -> str:
    if not steps:
        return "none"
    shown = ", ".join(map(str, steps[-10:]))
    return shown if len(steps) <= 10 else f"... {shown}"


def load_reference(
    text: str | os.PathLike[str],
    loader: Callable[[RunReader, Manifest], Any],
) -> Any:
    """Resolve a run reference and hand the reader and manifest to ``loader``."""
    parsed = parse_reference(text)
    if parsed is None:
        raise CheckpointNotFoundError("not a run reference", path=os.fspath(text))
    reader = RunReader(parsed[0])
    return reader.read(parsed[1], lambda manifest: loader(reader, manifest))
