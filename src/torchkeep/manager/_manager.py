"""`CheckpointManager`: a directory of checkpoints with retention, exact resume and async writes.

A save goes in four steps, each one safe to interrupt (layout in ``format/_run``):

1. capture the app (models, optimizers, schedulers, RNG, plain values) into one nested state,
   and describe how to rebuild the models whose constructor arguments are known (recorded in
   the manifest, so that ``torchkeep.load_model("RUN@best")`` can rebuild them);
2. hash every tensor; write those whose bytes the run does not hold yet into a new pack
   (temp file, fsync, rename, fsync of the directory);
3. commit: write the manifest to a temp file and rename it into ``checkpoints/``;
4. retention: delete the manifests the policy drops, then the packs no remaining manifest uses.

A crash before 3 leaves no checkpoint, only an unreferenced pack that the next writer sweeps. A
crash during 4 leaves extra checkpoints or packs, never a manifest pointing at a missing pack,
because a manifest always goes before its packs.

A failure before 3 raises ``StorageError`` and leaves the run as it was. After 3 the checkpoint
is saved whatever happens: a failure to record the metrics history, to apply retention or to
delete unused packs (or of the directory fsync after the rename) is a ``CleanupWarning``, and
the next save retries that work. ``save`` never reports a committed checkpoint as failed.

The pieces: ``_writer.py`` (staging, hashing, the commit order), ``_gc.py`` (deleting files),
``_retention.py`` (what to keep), ``_runfile.py`` (the stored policy), ``_aftercommit.py`` (async
saves, metrics history, warnings after a commit), ``_overlap.py``/``_staging.py``/``_waves.py``.
"""

from __future__ import annotations

import operator
import os
import threading
from collections.abc import Mapping, MutableMapping
from typing import Any

from torchkeep.distributed import RankedRun, RankStatePolicy
from torchkeep.errors import (
    CheckpointNotFoundError,
    InvalidArgumentError,
    StorageError,
    TorchkeepError,
)
from torchkeep.format import (
    LOCK_FILE,
    Flattened,
    RunReader,
    clean_metrics,
    flatten,
    metadata_json,
    system_info,
)
from torchkeep.format._deferred import deferring, handing_on
from torchkeep.manager._aftercommit import AfterCommit, BackgroundSaves
from torchkeep.manager._gc import sweep
from torchkeep.manager._overlap import Overlap, OverlapMethods, Snapshot
from torchkeep.manager._prune import Pruning
from torchkeep.manager._records import CheckpointRecord, RestoreInfo, record_of, restore_info
from torchkeep.manager._retention import (
    POLICY_FIELDS,
    Mode,
    RetentionPolicy,
    rank_by_metric,
    select,
)
from torchkeep.manager._runfile import create_run, given_values, open_policy
from torchkeep.manager._writer import Hasher, Stager, write_checkpoint
from torchkeep.state import describe_models
from torchkeep.storage import local_path, storage_for


class CheckpointManager(Pruning, OverlapMethods):
    """A run of checkpoints in one directory: save, restore, retention, references.

    Args:
        directory: the run directory (created when missing).
        keep_last: keep the N most recent checkpoints.
        keep_best: keep the K best by ``monitor``.
        keep_every: keep every checkpoint whose step is a multiple of E.
        monitor: the metric that ranks checkpoints (``"val_loss"``).
        mode: ``"min"`` or ``"max"``.
        async_save: ``save`` copies the state to host memory and returns; a background thread
            writes and commits. The next ``save`` (or ``wait``/``close``) waits for it and raises
            its error if it failed.
        overlap: with ``async_save``, ``save`` returns at once; the copy to host memory runs
            during the next steps (hooks guard what changes: docs/architecture.md).
        staging_limit: host bytes for async staging; a larger state is staged in waves.
        read_only: open an existing run to list and load only; takes no lock, writes nothing.
        barrier_timeout, per_rank, rank_state, distributed: for ``torch.distributed`` jobs, in
            which every rank builds its manager the same way and rank 0 commits; with
            ``distributed=False`` this process alone writes the run (one rank saves).
        storage_options: for a URL (``s3://bucket/run``), its fsspec filesystem's options
            (``endpoint_url``, credentials...); a lease object holds a remote run (format.md).

    Retention arguments left out are taken from the run's stored policy, so a manager opened on an
    existing run with no arguments keeps its rules. One writer per run: a second raises
    ``RunLockedError``.

    Example:
        >>> app = {"model": model, "optimizer": opt, "rng": torchkeep.RNGState(), "epoch": 0}
        >>> with torchkeep.CheckpointManager("runs/exp1", keep_last=3, keep_best=1,
        ...                                  monitor="val_loss") as mgr:
        ...     info = mgr.restore(app)                     # None on a fresh run
        ...     start = info.step + 1 if info else 0
        ...     for epoch in range(start, 10):
        ...         app["epoch"] = epoch
        ...         ...
        ...         mgr.save(epoch, app, metrics={"val_loss": val_loss})
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        keep_last: int | None = None,
        keep_best: int | None = None,
        keep_every: int | None = None,
        monitor: str | None = None,
        mode: Mode | None = None,
        async_save: bool = False,
        overlap: bool = False,
        staging_limit: int | None = None,
        read_only: bool = False,
        barrier_timeout: float | None = None,
        per_rank: tuple[str, ...] | list[str] = (),
        rank_state: RankStatePolicy = "strict",
        distributed: bool = True,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.root = local_path(directory, storage_options)
        self._ranks = RankedRun(
            self.root,
            timeout=barrier_timeout,
            per_rank=per_rank,
            rank_state=rank_state,
            read_only=read_only,
            alone=not distributed,
        )
        self.read_only = read_only
        self.async_save = async_save
        distributed = self._ranks.group.distributed
        self._overlap = Overlap(
            staging_limit, async_save=async_save, overlap=overlap, distributed=distributed
        )
        self._lock = storage_for(self.root).lock(str(self.root / LOCK_FILE))  # a lease remotely
        self._mutex = threading.RLock()
        self._stager = Stager()
        self._hasher = Hasher()
        self._system: dict[str, Any] = {}
        # Work after a commit that failed: reported as warnings on the caller's thread, and
        # retried by the next save (history lines not written yet, packs to collect).
        self._after = AfterCommit(self.root)
        self._background = BackgroundSaves[CheckpointRecord](self.root, self._after.log)
        values = (keep_last, keep_best, keep_every, monitor, mode)
        given = dict(zip(POLICY_FIELDS, values, strict=True))
        if read_only or not self._ranks.writer:
            if not read_only:  # another rank of a job: rank 0 creates the run, then it reads
                self._ranks.wait_opened()
            self._reader = RunReader(self.root, ranking=rank_by_metric)
            self.policy = RetentionPolicy.from_dict({**self._reader.policy, **given_values(given)})
            self._manifests = {m.step: m for m in self._reader.manifests()}
            return
        with self._ranks.opening():  # the other ranks wait for the run, or rank 0's error
            create_run(self.root)
            self._lock.acquire()
            try:
                self.policy = open_policy(self.root, given)
                self._reader = RunReader(self.root, ranking=rank_by_metric)
                self._manifests = {m.step: m for m in self._reader.manifests()}
                try:
                    sweep(self.root, self._manifests.values())
                except OSError as exc:  # invisible to readers; the next open retries
                    self._after.retainer.due = True
                    self._after.log.warn_later(
                        f"could not remove what an interrupted save left: {exc}"
                    )
            except BaseException:
                self._lock.release()
                raise
        self._system = system_info()
        self._after.log.emit()

    # -- reading --------------------------------------------------------------------------------

    @property
    def checkpoints(self) -> list[CheckpointRecord]:
        """Every committed checkpoint, oldest first, with why it is kept."""
        self._refresh()
        with self._mutex:
            manifests = sorted(self._manifests.items())
        kept = select([(s, m.metrics) for s, m in manifests], self.policy)
        return [record_of(m, kept.get(m.step, ())) for _, m in manifests]

    @property
    def latest(self) -> CheckpointRecord | None:
        """The most recent checkpoint, or ``None`` on an empty run."""
        return next(reversed(self.checkpoints), None)

    @property
    def best(self) -> CheckpointRecord | None:
        """The best checkpoint by the run's ``monitor``, or ``None``."""
        return next((r for r in self.checkpoints if "best" in r.kept), None)

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every metrics record saved in this run (also of checkpoints deleted since), in order."""
        return self._after.history.read()

    def _refresh(self) -> None:
        if self.read_only or not self._ranks.writer:
            self._manifests = {m.step: m for m in self._reader.manifests()}

    # -- restoring ------------------------------------------------------------------------------

    def restore(
        self,
        app: MutableMapping[str, Any],
        which: str | int = "latest",
        *,
        strict: bool = True,
        verify: bool = True,
        rank_state: RankStatePolicy | None = None,
    ) -> RestoreInfo | None:
        """Load a checkpoint into ``app`` in place; ``None`` when the run has no checkpoint yet.

        Args:
            app: the same kind of dict that was saved; stateful objects are loaded in place and
                plain values are written back into it.
            which: ``"latest"``, ``"best"``, or a step.
            strict: raise when the app and the checkpoint hold different entries or keys.
            verify: check each tensor against its stored hash first (default); ``False`` skips it.
            rank_state: the per-rank policy at another world size (default: the manager's).

        Raises:
            IncompatibleStateError: the checkpoint does not fit (another architecture...); the app
                is left as it was when this is detected before loading.
            CheckpointNotFoundError: ``which`` names no checkpoint.
        """
        self.wait()
        self._refresh()
        if not self._manifests:
            if which != "latest":
                raise CheckpointNotFoundError(
                    f"the run has no checkpoint yet, so no {which!r}", path=str(self.root)
                )
            return None
        # Resolved and read in one go: a writer beside this read-only manager may prune.
        with deferring() as deferred:  # remote: each tensor fetched and checked when used
            manifest, state = self._reader.read(
                str(which), lambda m: (m, self._reader.load(m, verify=verify, shards=False))
            )
        with handing_on(deferred):  # a sharded checkpoint's shards: read by each rank
            values = self._ranks.restore(
                app,
                state,
                strict=strict,
                source=str(manifest.path),
                rank_state=rank_state,
                manifest=manifest,
                reader=self._reader,
                verify=verify,
            )
        return restore_info(manifest, values)

    # -- saving ---------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        app: Mapping[str, Any],
        metrics: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> CheckpointRecord | None:
        """Save a checkpoint of ``app`` at ``step``, then apply retention.

        Returns the new record, or ``None`` with ``async_save`` (the write goes on in the
        background; ``wait()`` returns the record).

        Raises:
            UnsupportedValueError: the app holds a value that cannot be stored.
            StorageError: the disk failed; earlier checkpoints are intact.
        """
        if self._ranks.writer or self.read_only:
            self._check_writable()
        if isinstance(step, bool) or not hasattr(step, "__index__") or operator.index(step) < 0:
            raise InvalidArgumentError(f"step must be a non-negative integer, not {step!r}")
        step = operator.index(step)
        self.wait()
        cleaned = clean_metrics(metrics)
        user_metadata = metadata_json(dict(metadata) if metadata is not None else None)
        if not self._ranks.writer:  # another rank of a job: its own state; rank 0 commits
            wait = self._ranks.save_part(
                step, app, self._hasher.hashes, record_of, defer=self.async_save
            )
            if not self.async_save:
                return wait()
            self._background.submit(wait)
            return None
        # In a job: the shared entries and rank 0's own; sharded models written through DCP.
        state = self._ranks.capture(app, step, self._hasher.hashes, defer=self.async_save)
        models = describe_models(app)  # here, on the caller's thread, even when async
        write = self._ranks.committing(self._write, step)
        if not self.async_save:
            record = write(step, flatten(state), cleaned, user_metadata, models)
            self._after.log.emit()
            return record
        # Flatten here so that unstorable values fail in save(), then copy to host memory.
        self._submit(write, step, flatten(state), app, cleaned, user_metadata, models)
        return None

    def wait(self) -> CheckpointRecord | None:
        """Wait for a pending async save; raise its error if it failed.

        A ``CleanupWarning`` of a save that committed (history, retention, GC) is emitted here.
        """
        record = self._background.wait()
        self._after.log.emit()
        return record

    def _write(
        self,
        step: int,
        flat: Flattened | Snapshot,
        metrics: dict[str, Any],
        metadata: dict[str, Any],
        models: dict[str, Any],
        extra: Any = None,
        sharded: dict[str, Any] | None = None,
    ) -> CheckpointRecord:
        with self._mutex:
            committed = list(self._manifests.values())
        info = {"metrics": metrics, "metadata": metadata, "system": self._system, "models": models}
        try:
            if isinstance(flat, Snapshot):
                manifest = self._write_snapshot(flat, committed, info)
            else:
                manifest = write_checkpoint(
                    self.root,
                    step,
                    flat,
                    self._hasher.hashes(flat.tensors),
                    committed,
                    **info,
                    extra=extra,
                    sharded=sharded,
                )
        except StorageError as exc:
            if not exc.committed:
                raise
            # Renamed into place, so committed; only its directory's fsync failed.
            manifest = self._reader.manifest(step)
            self._after.log.warn_later(
                f"step {step} is saved, but its directory could not be fsynced, so it may not "
                f"survive a power cut: {exc.message}",
                exc.path,
            )
        # The commit point is behind us: from here on, a failure is a warning, not an error.
        with self._mutex:
            kept = self._after.finish(manifest, metrics, self._manifests, self.policy)
            return record_of(manifest, kept)

    # -- plumbing -------------------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self.read_only:
            raise TorchkeepError(
                "this manager was opened read-only",
                path=str(self.root),
                hint="open it without read_only=True",
            )
        if not self._ranks.writer:
            raise TorchkeepError(
                f"rank {self._ranks.group.rank} does not write the run: rank 0 prunes and commits",
                path=str(self.root),
                hint="call prune() on rank 0 only (save() and restore() go on every rank)",
            )
        if not self._lock.held:
            raise TorchkeepError(
                "this manager is closed", path=str(self.root), hint="open a new one"
            )

    def close(self) -> None:
        """Finish a pending save (raising its error), then release the run's writer lock."""
        try:
            self.wait()
            self._ranks.closing()  # in a job, rank 0 (the store's host) waits for the others
        finally:
            self._background.close()
            self._hasher.close()
            self._overlap.close()
            self._stager = Stager()
            self._lock.release()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "read-only" if self.read_only else "writer"
        return f"CheckpointManager({str(self.root)!r}, {mode}, {len(self._manifests)} checkpoints)"
