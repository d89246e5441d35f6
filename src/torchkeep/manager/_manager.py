"""`CheckpointManager`: a directory of checkpoints with retention, exact resume and async writes.

A save goes in four steps, each one safe to interrupt (layout in ``format/_run.py``):

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
"""

from __future__ import annotations

import atexit
import contextlib
import json
import operator
import os
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Mapping, MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any

from torchkeep._version import __version__
from torchkeep.errors import (
    CheckpointNotFoundError,
    CleanupWarning,
    InvalidArgumentError,
    StorageError,
    TorchkeepError,
)
from torchkeep.format import (
    FORMAT_VERSION,
    LOCK_FILE,
    MANIFEST_DIR,
    METRICS_FILE,
    PACK_DIR,
    RUN_FILE,
    Flattened,
    Manifest,
    RunReader,
    check_layout,
    flatten,
    metadata_json,
)
from torchkeep.manager._lock import RunLock
from torchkeep.manager._records import CheckpointRecord, RestoreInfo
from torchkeep.manager._retention import Mode, RetentionPolicy, select
from torchkeep.manager._writer import (
    Hasher,
    Stager,
    clean_metrics,
    collect_packs,
    delete_manifests,
    sweep,
    system_info,
    write_bytes,
    write_checkpoint,
)
from torchkeep.state import capture_app, describe_models, restore_app
from torchkeep.storage import atomic_write, local_path
from torchkeep.storage._local import storage_error


class CheckpointManager:
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
        read_only: open an existing run to list and load only; takes no lock, writes nothing.

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
        read_only: bool = False,
    ) -> None:
        self.root = local_path(directory)
        self.read_only = read_only
        self.async_save = async_save
        self._lock = RunLock(self.root / LOCK_FILE)
        self._pending: Future[CheckpointRecord] | None = None
        self._mutex = threading.RLock()
        self._stager = Stager()
        self._hasher = Hasher()
        self._system: dict[str, Any] = {}
        self._executor: ThreadPoolExecutor | None = None
        # Work after a commit that failed: reported as warnings on the caller's thread, and
        # retried by the next save (history lines not written yet, packs to collect).
        self._cleanup: list[CleanupWarning] = []
        self._unrecorded: list[str] = []
        self._gc_due = False
        given = {
            "keep_last": keep_last,
            "keep_best": keep_best,
            "keep_every": keep_every,
            "monitor": monitor,
            "mode": mode,
        }
        if read_only:
            self._reader = RunReader(self.root)
            self.policy = RetentionPolicy.from_dict({**self._reader.policy, **_given(given)})
            self._manifests = {m.step: m for m in self._reader.manifests()}
            return
        if self.root.is_dir():
            check_layout(self.root)  # before anything is written, locked or swept
        try:
            (self.root / MANIFEST_DIR).mkdir(parents=True, exist_ok=True)
            (self.root / PACK_DIR).mkdir(exist_ok=True)
        except OSError as exc:
            raise storage_error(exc, self.root, "create the run directory") from exc
        check_layout(self.root)
        self._lock.acquire()
        try:
            existing = RunReader(self.root) if (self.root / RUN_FILE).is_file() else None
            stored = existing.policy if existing is not None else {}
            self.policy = RetentionPolicy.from_dict({**stored, **_given(given)})
            history = _policy_history(existing.description) if existing is not None else []
            if existing is not None and RetentionPolicy.from_dict(stored) != self.policy:
                before = RetentionPolicy.from_dict(stored)
                # Retention deletes checkpoints: a policy changed by a mistyped argument on
                # resume must be seen, and the run must remember what it kept by before.
                warnings.warn(
                    f"{self.root}: the run's retention policy changes from "
                    f"{_policy_text(before)} to {_policy_text(self.policy)}; the change is "
                    f"recorded in {RUN_FILE} (policy_history). Open the run without retention "
                    "arguments to keep its stored policy",
                    UserWarning,
                    stacklevel=2,
                )
                history.append(
                    {"time": time.time(), "from": before.to_dict(), "to": self.policy.to_dict()}
                )
            if existing is None or stored != self.policy.to_dict():
                self._write_run_file(history)
            self._reader = RunReader(self.root)
            self._manifests = {m.step: m for m in self._reader.manifests()}
            try:
                sweep(self.root, self._manifests.values())
            except OSError as exc:  # leftovers are invisible to readers; the next open retries
                self._gc_due = True
                self._warn_later(f"could not remove what an interrupted save left: {exc}")
        except BaseException:
            self._lock.release()
            raise
        self._system = system_info()
        self._emit_cleanup()

    # -- reading --------------------------------------------------------------------------------

    @property
    def checkpoints(self) -> list[CheckpointRecord]:
        """Every committed checkpoint, oldest first, with why it is kept."""
        self._refresh()
        with self._mutex:
            manifests = sorted(self._manifests.items())
        kept = select([(s, m.metrics) for s, m in manifests], self.policy)
        return [self._record(m, kept.get(m.step, ())) for _, m in manifests]

    @property
    def latest(self) -> CheckpointRecord | None:
        """The most recent checkpoint, or ``None`` on an empty run."""
        records = self.checkpoints
        return records[-1] if records else None

    @property
    def best(self) -> CheckpointRecord | None:
        """The best checkpoint by the run's ``monitor``, or ``None``."""
        records = self.checkpoints
        return next((r for r in records if "best" in r.kept), None)

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every metrics record saved in this run (also of checkpoints deleted since), in order."""
        path = self.root / METRICS_FILE
        if not path.is_file():
            return []
        records = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            with contextlib.suppress(ValueError, RecursionError):  # a damaged or hostile line
                record = json.loads(line)
                if isinstance(record, dict) and isinstance(record.get("step"), int):
                    records.append(record)
        return records

    def _record(self, m: Manifest, kept: tuple[str, ...]) -> CheckpointRecord:
        return CheckpointRecord(
            step=m.step,
            time=m.time,
            metrics=m.metrics,
            metadata=m.metadata,
            size=m.nbytes,
            kept=kept,
            path=str(m.path),
        )

    def _refresh(self) -> None:
        if self.read_only:
            self._manifests = {m.step: m for m in self._reader.manifests()}

    # -- restoring ------------------------------------------------------------------------------

    def restore(
        self,
        app: MutableMapping[str, Any],
        which: str | int = "latest",
        *,
        strict: bool = True,
        verify: bool = True,
    ) -> RestoreInfo | None:
        """Load a checkpoint into ``app`` in place; ``None`` when the run has no checkpoint yet.

        Args:
            app: the same kind of dict that was saved; stateful objects are loaded in place and
                plain values are written back into it.
            which: ``"latest"``, ``"best"``, or a step.
            strict: raise when the app and the checkpoint hold different entries or keys.
            verify: check every tensor against the hash in the manifest first (the default);
                ``False`` skips that read for speed.

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
        manifest, state = self._reader.read(
            str(which), lambda m: (m, self._reader.load(m, verify=verify))
        )
        values = restore_app(app, state, strict=strict, source=str(manifest.path))
        return RestoreInfo(
            step=manifest.step,
            metrics=manifest.metrics,
            metadata=manifest.metadata,
            values=values,
            path=str(manifest.path),
        )

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
        self._check_writable()
        if isinstance(step, bool) or not hasattr(step, "__index__") or operator.index(step) < 0:
            raise InvalidArgumentError(f"step must be a non-negative integer, not {step!r}")
        step = operator.index(step)
        self.wait()
        cleaned = clean_metrics(metrics)
        user_metadata = metadata_json(dict(metadata) if metadata is not None else None)
        state = capture_app(app)
        models = describe_models(app)  # here, on the caller's thread, even when async
        if not self.async_save:
            record = self._write(step, flatten(state), cleaned, user_metadata, models)
            self._emit_cleanup()
            return record
        # Flatten here so that unstorable values fail in save(), then copy to host memory.
        staged = self._stager.stage(flatten(state))
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torchkeep-save")
            # A process that exits with a write pending finishes it (the executor's thread is
            # joined at exit); if that write then fails, say so rather than exit silently.
            atexit.register(_report_at_exit, weakref.ref(self))
        self._pending = self._executor.submit(
            self._write, step, staged, cleaned, user_metadata, models
        )
        return None

    def wait(self) -> CheckpointRecord | None:
        """Wait for a pending async save; raise its error if it failed.

        A ``CleanupWarning`` of a save that committed (history, retention, GC) is emitted here.
        """
        pending, self._pending = self._pending, None
        record = None if pending is None else pending.result()
        self._emit_cleanup()
        return record

    def _write(
        self,
        step: int,
        flat: Flattened,
        metrics: dict[str, Any],
        metadata: dict[str, Any],
        models: dict[str, Any],
    ) -> CheckpointRecord:
        with self._mutex:
            known = [r for m in self._manifests.values() for r in m.tensors.values()]
            known_packs = {
                name: digest
                for m in self._manifests.values()
                for name, digest in m.pack_digests.items()
            }
        try:
            manifest = write_checkpoint(
                self.root,
                step,
                flat,
                self._hasher.hashes(flat.tensors),
                known,
                known_packs,
                metrics=metrics,
                metadata=metadata,
                system=self._system,
                models=models,
            )
        except StorageError as exc:
            if not exc.committed:
                raise
            # Renamed into place, so committed; only its directory's fsync failed.
            manifest = self._reader.manifest(step)
            self._warn_later(
                f"step {step} is saved, but its directory could not be fsynced, so it may not "
                f"survive a power cut: {exc.message}",
                exc.path,
            )
        # The commit point is behind us: from here on, a failure is a warning, not an error.
        with self._mutex:
            previous = self._manifests.get(step)
            self._manifests[step] = manifest
            try:
                self._append_history(step, manifest.time, metrics)
            except OSError as exc:
                self._warn_later(
                    f"step {step} is saved, but its metrics could not be added to "
                    f"{METRICS_FILE} ({_reason(exc)}); the next save retries",
                    str(self.root / METRICS_FILE),
                )
            try:
                kept = self._apply_retention(self.policy, replaced=previous)
            except OSError as exc:
                self._warn_later(
                    f"step {step} is saved, but retention could not finish ({_reason(exc)}); "
                    "the run keeps extra checkpoints or packs until the next save retries",
                    getattr(exc, "path", None) or str(self.root),
                )
                kept = select([(s, m.metrics) for s, m in self._manifests.items()], self.policy)
            return self._record(manifest, kept.get(step, ()))

    def _append_history(self, step: int, time: float, metrics: dict[str, Any]) -> None:
        """Append this save's metrics line, after any that earlier saves could not write."""
        line = json.dumps({"step": step, "time": time, "metrics": metrics}) + "\n"
        lines = [*self._unrecorded, line]
        data = memoryview("".join(lines).encode())
        # Not fsynced: every committed manifest holds its own metrics, and a history line
        # lost in a power cut costs nothing the checkpoints do not keep.
        try:
            fd = os.open(self.root / METRICS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                start = os.lseek(fd, 0, os.SEEK_END)
                try:
                    while data:
                        data = data[os.write(fd, data) :]
                except OSError:
                    with contextlib.suppress(OSError):  # no half line for the retry to follow
                        os.ftruncate(fd, start)
                    raise
            finally:
                os.close(fd)
        except OSError:
            self._unrecorded = lines
            raise
        self._unrecorded = []

    def _warn_later(self, message: str, path: str | None = None) -> None:
        """Keep a warning for the caller's thread (an async save runs on another)."""
        with self._mutex:
            self._cleanup.append(CleanupWarning(message, path=path))

    def _emit_cleanup(self) -> None:
        with self._mutex:
            pending, self._cleanup = self._cleanup, []
        for warning in pending:
            warnings.warn(warning, stacklevel=3)

    # -- retention and garbage collection -------------------------------------------------------

    def prune(
        self,
        *,
        keep_last: int | None = None,
        keep_best: int | None = None,
        keep_every: int | None = None,
        dry_run: bool = False,
    ) -> list[int]:
        """Delete checkpoints that these rules (plus the latest and the best) do not keep.

        The run's stored policy is not changed. Returns the steps deleted (or that would be, with
        ``dry_run``).
        """
        self._check_writable()
        self.wait()
        policy = RetentionPolicy(
            keep_last=keep_last,
            keep_best=keep_best,
            keep_every=keep_every,
            monitor=self.policy.monitor,
            mode=self.policy.mode,
        )
        kept = select([(s, m.metrics) for s, m in self._manifests.items()], policy)
        doomed = sorted(set(self._manifests) - set(kept))
        if not dry_run:
            self._apply_retention(policy)
        return doomed

    def _apply_retention(
        self, policy: RetentionPolicy, replaced: Manifest | None = None
    ) -> dict[int, tuple[str, ...]]:
        """Delete what ``policy`` does not keep; a failure raises ``StorageError`` and leaves the
        rest for the next call (a manifest not deleted stays listed; packs stay until collected)."""
        kept = select([(s, m.metrics) for s, m in self._manifests.items()], policy)
        doomed = sorted(set(self._manifests) - set(kept))
        if doomed or replaced is not None:
            self._gc_due = True
        folder = self.root / MANIFEST_DIR
        try:
            if doomed:
                # The manifests go first: from then on nothing refers to their packs.
                delete_manifests(self.root, [self._manifests[step] for step in doomed])
                for step in doomed:
                    del self._manifests[step]
            if self._gc_due:
                folder = self.root / PACK_DIR
                collect_packs(self.root, self._manifests.values())
                self._gc_due = False
        except StorageError:
            raise
        except OSError as exc:
            raise storage_error(exc, folder, "delete unused checkpoint files") from exc
        return kept

    # -- plumbing -------------------------------------------------------------------------------

    def _write_run_file(self, policy_history: list[dict[str, Any]]) -> None:
        document: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "kind": "torchkeep-run",
            "torchkeep_version": __version__,
            "policy": self.policy.to_dict(),
        }
        if policy_history:
            document["policy_history"] = policy_history
        text = json.dumps(document, indent=2).encode()
        atomic_write(self.root / RUN_FILE, lambda f: write_bytes(f, text))

    def _check_writable(self) -> None:
        if self.read_only:
            raise TorchkeepError(
                "this manager was opened read-only",
                path=str(self.root),
                hint="open it without read_only=True",
            )
        if not self._lock.held:
            raise TorchkeepError(
                "this manager is closed", path=str(self.root), hint="open a new one"
            )

    def close(self) -> None:
        """Finish a pending save (raising its error), then release the run's writer lock."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            self._hasher.close()
            self._stager = Stager()
            self._lock.release()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "read-only" if self.read_only else "writer"
        return f"CheckpointManager({str(self.root)!r}, {mode}, {len(self._manifests)} checkpoints)"


def _report_at_exit(ref: weakref.ref[CheckpointManager]) -> None:
    manager = ref()
    pending = None if manager is None else manager._pending
    if manager is None:
        return
    if pending is not None and pending.done() and pending.exception():
        print(
            f"torchkeep: the last async save to {manager.root} failed: {pending.exception()}",
            file=sys.stderr,
        )
    for warning in manager._cleanup:
        print(f"torchkeep: {warning}", file=sys.stderr)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _policy_text(policy: RetentionPolicy) -> str:
    rules = ", ".join(f"{k}={v!r}" for k, v in policy.to_dict().items() if v is not None)
    return f"({rules})"


def _policy_history(description: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The recorded policy changes of a run file, oldest first (entries that are not objects
    are dropped: the history informs, it decides nothing)."""
    history = description.get("policy_history", [])
    return [h for h in history if isinstance(h, dict)] if isinstance(history, list) else []


def _given(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}
