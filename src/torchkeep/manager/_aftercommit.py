"""The work around a commit point: async saves, the metrics history, the warnings of failures.

An async save (:class:`BackgroundSaves`) runs one write at a time on a background thread; the
next call of the manager waits for it and raises its error.

Once a manifest is renamed into place the checkpoint is saved, whatever happens next. So a
failure after it (to append the metrics line, to apply retention, to delete unused packs) is no
error of ``save``: it is kept as a ``CleanupWarning``, emitted on the caller's thread (an async
save runs on another), and the next save retries the work. A process that exits with warnings
(or a failed async save) still pending prints them (see :class:`BackgroundSaves`).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import sys
import threading
import warnings
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Generic, TypeVar

from torchkeep.errors import CleanupWarning
from torchkeep.format import METRICS_FILE, Manifest
from torchkeep.manager._gc import Retainer
from torchkeep.manager._retention import RetentionPolicy, select
from torchkeep.storage import storage_for

T = TypeVar("T")


class CleanupLog:
    """Warnings kept for the caller's thread, from whichever thread found them."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self.pending: list[CleanupWarning] = []

    def warn_later(self, message: str, path: str | None = None) -> None:
        with self._mutex:
            self.pending.append(CleanupWarning(message, path=path))

    def emit(self) -> None:
        """Emit the kept warnings, naming the caller of the manager's method."""
        with self._mutex:
            pending, self.pending = self.pending, []
        for warning in pending:
            warnings.warn(warning, stacklevel=3)


class MetricsHistory:
    """``metrics.jsonl``: every metrics record saved in the run, one JSON object a line.

    Not fsynced: every committed manifest holds its own metrics, and a history line lost in a
    power cut costs nothing the checkpoints do not keep. Lines that could not be written are
    kept and written before the next one, in order.
    """

    def __init__(self, root: Path) -> None:
        self.path = root / METRICS_FILE
        self._unrecorded: list[str] = []

    def append(self, step: int, time: float, metrics: dict[str, Any]) -> None:
        """Append this save's metrics line, after any that earlier saves could not write."""
        line = json.dumps({"step": step, "time": time, "metrics": metrics}) + "\n"
        lines = [*self._unrecorded, line]
        try:  # all or nothing: no half line for the retry to follow
            storage_for(self.path).append(str(self.path), "".join(lines).encode())
        except OSError:
            self._unrecorded = lines
            raise
        self._unrecorded = []

    def read(self) -> list[dict[str, Any]]:
        """Every record, in order; damaged or hostile lines are skipped."""
        if not self.path.is_file():
            return []
        records = []
        with storage_for(self.path).open_read(str(self.path)) as f:
            text = f.read().decode("utf-8", errors="replace")
        for line in text.splitlines():
            with contextlib.suppress(ValueError, RecursionError):
                record = json.loads(line)
                if isinstance(record, dict) and isinstance(record.get("step"), int):
                    records.append(record)
        return records


class AfterCommit:
    """The work after a save's commit point, where every failure is a warning, not an error."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.log = CleanupLog()
        self.history = MetricsHistory(root)
        self.retainer = Retainer(root)

    def finish(
        self,
        manifest: Manifest,
        metrics: dict[str, Any],
        manifests: dict[int, Manifest],
        policy: RetentionPolicy,
    ) -> tuple[str, ...]:
        """Record the committed ``manifest`` in ``manifests`` and the metrics history, apply
        retention; return why the new checkpoint is kept."""
        step = manifest.step
        previous = manifests.get(step)
        manifests[step] = manifest
        try:
            self.history.append(step, manifest.time, metrics)
        except OSError as exc:
            self.log.warn_later(
                f"step {step} is saved, but its metrics could not be added to "
                f"{METRICS_FILE} ({reason(exc)}); the next save retries",
                str(self.history.path),
            )
        try:
            kept = self.retainer.apply(manifests, policy, replaced=previous)
        except OSError as exc:
            self.log.warn_later(
                f"step {step} is saved, but retention could not finish ({reason(exc)}); "
                "the run keeps extra checkpoints or packs until the next save retries",
                getattr(exc, "path", None) or str(self.root),
            )
            kept = select([(s, m.metrics) for s, m in manifests.items()], policy)
        return kept.get(step, ())


class BackgroundSaves(Generic[T]):
    """At most one save in flight on a thread of its own; its result or error comes at
    :meth:`wait`.

    A process that exits with a write pending finishes it (the executor's thread is joined at
    exit); if that write then fails, or left warnings, they are printed rather than lost.
    """

    def __init__(self, root: Path, log: CleanupLog) -> None:
        self.root = root
        self.log = log
        self.pending: Future[T] | None = None
        self._executor: ThreadPoolExecutor | None = None

    def submit(self, write: Callable[..., T], *args: Any) -> None:
        """Start ``write(*args)``; the caller has waited for the previous one."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torchkeep-save")
            atexit.register(_report_at_exit, weakref.ref(self))
        self.pending = self._executor.submit(write, *args)

    def wait(self) -> T | None:
        """The result of the pending write (``None`` when there is none); raises its error."""
        pending, self.pending = self.pending, None
        return None if pending is None else pending.result()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


def _report_at_exit(ref: weakref.ref[BackgroundSaves[Any]]) -> None:
    """Print what an exiting process would otherwise lose silently."""
    saves = ref()
    if saves is None:
        return
    pending = saves.pending
    if pending is not None and pending.done() and pending.exception():
        print(
            f"torchkeep: the last async save to {saves.root} failed: {pending.exception()}",
            file=sys.stderr,
        )
    for warning in saves.log.pending:
        print(f"torchkeep: {warning}", file=sys.stderr)


def reason(exc: OSError) -> str:
    return exc.strerror or str(exc)
