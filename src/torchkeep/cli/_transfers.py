"""Progress bars for uploads and downloads to remote stores that take longer than a second.

The remote store reports each part it uploads and each block it downloads to an observer
(:func:`torchkeep.storage.observe_transfers`); the CLI's observer draws a bar per object on
stderr, only on a terminal and only once a transfer has lasted about a second, so that quick
commands and piped output stay as they are.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TransferSpeedColumn,
)

from torchkeep.storage import observe_transfers

__all__ = ["TransferBars", "transfer_bars"]

AFTER_SECONDS = 1.0


class TransferBars:
    """The observer: ``(kind, path, nbytes, total)`` for each part or block moved."""

    def __init__(self, console: Console | None = None, after: float = AFTER_SECONDS) -> None:
        self.console = console or Console(stderr=True)
        self.after = after
        self.progress: Progress | None = None
        self.tasks: dict[tuple[str, str], TaskID] = {}
        self.started: dict[tuple[str, str], float] = {}
        self.done: dict[tuple[str, str], int] = {}
        self.lock = threading.Lock()

    def __call__(self, kind: str, path: str, nbytes: int, total: int | None) -> None:
        key = (kind, path)
        now = time.monotonic()
        with self.lock:
            started = self.started.setdefault(key, now)
            self.done[key] = self.done.get(key, 0) + nbytes
            if self.progress is None:
                if now - started < self.after or not self.console.is_terminal:
                    return
                self.progress = Progress(
                    TextColumn("{task.description}"),
                    BarColumn(),
                    DownloadColumn(),
                    TransferSpeedColumn(),
                    console=self.console,
                    transient=True,
                )
                self.progress.start()
            task = self.tasks.get(key)
            if task is None:
                name = path.rsplit("/", 1)[-1]
                self.tasks[key] = self.progress.add_task(
                    f"{kind} {name}", total=total, completed=self.done[key]
                )
            else:
                self.progress.update(task, completed=self.done[key], total=total)

    def close(self) -> None:
        with self.lock:
            if self.progress is not None:
                self.progress.stop()
                self.progress = None


@contextlib.contextmanager
def transfer_bars() -> Iterator[TransferBars]:
    """Show transfer progress while the block runs."""
    bars = TransferBars()
    with observe_transfers(bars):
        try:
            yield bars
        finally:
            bars.close()
