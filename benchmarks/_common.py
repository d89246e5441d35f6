"""Shared helpers of the benchmarks: the machine, the page cache, timing, states, the disk limit."""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import torch

import torchkeep as tk

MiB = 1024 * 1024


def machine_info(directory: Path) -> dict[str, Any]:
    """CPU, cores, RAM, free disk where the files go, load average and library versions."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                cpu,
            )
    except OSError:
        pass
    ram = 0
    try:
        with open("/proc/meminfo") as f:
            ram = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": round(ram / 1024**3, 1),
        "disk_free_gib": round(shutil.disk_usage(directory).free / 1024**3, 1),
        "bench_dir": str(directory),
        "load_average": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "safetensors": safetensors.__version__,
        "torchkeep": tk.__version__,
        "numpy": np.__version__,
    }


def drop_caches() -> bool:
    """Drop the whole page cache (needs root and a writable /proc/sys); False when refused."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def evict(paths: Iterable[Path]) -> None:
    """Drop these files' pages from the page cache (works without root once they are synced)."""
    for path in paths:
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for p in files:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_time(
    fn: Callable[[], object], repeat: int, before: Callable[[], object] | None = None
) -> float:
    """The median of ``repeat`` timings of ``fn``; ``before`` runs untimed before each one."""
    times = []
    for _ in range(repeat):
        if before is not None:
            before()
        times.append(timed(fn))
    return statistics.median(times)


def make_model(mib: int) -> torch.nn.Sequential:
    """A stack of 1024x1024 linear layers holding about ``mib`` MiB of float32 parameters."""
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(max(1, mib // 4))])


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def tensor_views(state: dict[str, torch.Tensor]) -> list[memoryview]:
    """Each tensor's own bytes, without a copy (CPU, contiguous tensors)."""
    return [
        memoryview(t.detach().contiguous().view(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
        for t in state.values()
    ]


def raw_write(views: list[memoryview], path: Path) -> None:
    """The disk's limit: the same bytes written with os.write, then fsync'd; no format at all."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for view in views:
            done = 0
            while done < view.nbytes:
                done += os.write(fd, view[done : done + 256 * MiB])
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class Target:
    """One target of the issue: ``ratio`` must be at most ``limit`` (or at least, with ``atleast``)."""

    name: str
    ratio: float
    limit: float
    atleast: bool = False
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.ratio >= self.limit if self.atleast else self.ratio <= self.limit

    def line(self) -> str:
        sign = ">=" if self.atleast else "<="
        verdict = "PASS" if self.passed else "MISS"
        return (
            f"{verdict}  {self.name}: {self.ratio:.3f} (target {sign} {self.limit}) {self.detail}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ratio": self.ratio,
            "limit": self.limit,
            "at_least": self.atleast,
            "pass": self.passed,
            "detail": self.detail,
        }
