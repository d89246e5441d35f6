"""Save, load, peak-RSS and hashing benchmarks of one state size, every library in one run."""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp
import xxhash
from _common import MiB, make_model, median_time, raw_write, state_bytes, tensor_views, timed

import torchkeep as tk

warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")

RSS_PROBE = r"""
import sys, warnings, torch, safetensors.torch, torchkeep as tk

def status(field):  # VmRSS now, VmHWM peak; ru_maxrss would include the parent's peak
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024

mib, path, how = int(sys.argv[1]), sys.argv[2], sys.argv[3]
with torch.device("meta"):
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(max(1, mib // 4))])
model = model.to_empty(device="cpu")
for p in model.parameters():
    p.data.zero_()  # touch the pages so that the model itself is resident
before = max(status("VmRSS"), status("VmHWM"))
if how == "torchkeep.load_into":
    tk.load_into(model, path)
elif how == "torch.load":
    model.load_state_dict(torch.load(path, weights_only=True))
elif how == "torch.load mmap":
    model.load_state_dict(torch.load(path, weights_only=True, mmap=True))
else:
    model.load_state_dict(safetensors.torch.load_file(path))
print(status("VmHWM") - before)
"""


def _fresh(path: Path) -> None:
    """Remove what a previous repeat wrote, untimed, so that every save starts alike.

    ``os.sync`` flushes what saves without fsync (torch.save, safetensors) left dirty, so that
    their writeback does not slow the next, timed, save.
    """
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    os.sync()


def _fresher(path: Path | None) -> Callable[[], None]:
    return lambda: None if path is None else _fresh(path)


def _torch_save_fsync(state: dict[str, torch.Tensor], path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


class _ManagerSave:
    """CheckpointManager saves into a fresh run each time (a second save would be deduplicated)."""

    def __init__(self, root: Path, state: dict[str, torch.Tensor], async_save: bool) -> None:
        self.root, self.state, self.async_save = root, state, async_save
        self.mgr: tk.CheckpointManager | None = None
        self.stalls: list[float] = []

    def before(self) -> None:
        if self.mgr is not None:
            self.mgr.close()
        _fresh(self.root)
        self.mgr = tk.CheckpointManager(self.root, async_save=self.async_save)

    def __call__(self) -> None:
        assert self.mgr is not None
        mgr = self.mgr
        self.stalls.append(timed(lambda: mgr.save(0, {"model": self.state})))
        mgr.wait()

    def close(self) -> None:
        if self.mgr is not None:
            self.mgr.close()
            self.mgr = None


class _DcpAsync:
    def __init__(self, path: Path, state: dict[str, torch.Tensor]) -> None:
        self.path, self.state = path, state
        self.stalls: list[float] = []

    def __call__(self) -> None:
        future: Any = None

        def call() -> None:
            nonlocal future
            future = dcp.async_save(  # type: ignore[attr-defined]
                {"model": self.state}, checkpoint_id=str(self.path)
            )

        self.stalls.append(timed(call))
        future.result()


def bench_saves(
    state: dict[str, torch.Tensor], d: Path, repeat: int
) -> dict[str, dict[str, float]]:
    """Median seconds per save (and the stall of the async ones), same state for all."""
    views = tensor_views(state)
    mgr_sync = _ManagerSave(d / "run-sync", state, async_save=False)
    mgr_async = _ManagerSave(d / "run-async", state, async_save=True)
    dcp_async = _DcpAsync(d / "dcp-async", state)
    saves: dict[str, tuple[Callable[[], object], Path | None, Callable[[], object] | None]] = {
        "raw os.write + fsync": (lambda: raw_write(views, d / "raw.bin"), d / "raw.bin", None),
        "torch.save": (lambda: torch.save(state, d / "torch.pt"), d / "torch.pt", None),
        "torch.save + fsync": (
            lambda: _torch_save_fsync(state, d / "torch-fsync.pt"),
            d / "torch-fsync.pt",
            None,
        ),
        "safetensors.save_file": (
            lambda: safetensors.torch.save_file(state, d / "st.safetensors"),
            d / "st.safetensors",
            None,
        ),
        "dcp.save": (
            lambda: dcp.save(  # type: ignore[attr-defined]
                {"model": state}, checkpoint_id=str(d / "dcp")
            ),
            d / "dcp",
            None,
        ),
        "dcp.async_save (to done)": (dcp_async, d / "dcp-async", None),
        "torchkeep.save": (
            lambda: tk.save(state, d / "tk.safetensors"),
            d / "tk.safetensors",
            None,
        ),
        "CheckpointManager sync": (mgr_sync, None, mgr_sync.before),
        "CheckpointManager async (to done)": (mgr_async, None, mgr_async.before),
    }
    out: dict[str, dict[str, float]] = {}
    for name, (fn, path, before) in saves.items():
        prepare = before if before is not None else _fresher(path)
        out[name] = {"seconds": median_time(fn, repeat, prepare)}
    # Keep the last run of each manager for the load benchmark; close them so that it can be read.
    mgr_sync.close()
    mgr_async.close()
    out["dcp.async_save (to done)"]["stall"] = sorted(dcp_async.stalls)[len(dcp_async.stalls) // 2]
    out["CheckpointManager async (to done)"]["stall"] = sorted(mgr_async.stalls)[
        len(mgr_async.stalls) // 2
    ]
    return out


def _touch(obj: Any) -> None:
    """Read every tensor, so that lazy (mmap) loads pay for their reads."""
    tensors = obj.values() if isinstance(obj, dict) else []
    for t in tensors:
        if isinstance(t, dict):
            _touch(t)
        else:
            t.sum()


def bench_loads(d: Path, repeat: int, cold: Callable[[list[Path]], object]) -> dict[str, float]:
    """Median seconds per load with a cold page cache; every tensor is read."""
    loads: dict[str, tuple[Callable[[], object], Path]] = {
        "torch.load": (
            lambda: _touch(torch.load(d / "torch.pt", weights_only=True)),
            d / "torch.pt",
        ),
        "torch.load mmap": (
            lambda: _touch(torch.load(d / "torch.pt", weights_only=True, mmap=True)),
            d / "torch.pt",
        ),
        "safetensors.load_file": (
            lambda: _touch(safetensors.torch.load_file(d / "st.safetensors")),
            d / "st.safetensors",
        ),
        "torchkeep.load": (lambda: _touch(tk.load(d / "tk.safetensors")), d / "tk.safetensors"),
        "torchkeep.load (run@latest)": (
            lambda: _touch(tk.load(f"{d / 'run-sync'}@latest")),
            d / "run-sync",
        ),
    }
    return {
        name: median_time(fn, repeat, functools.partial(cold, [path]))
        for name, (fn, path) in loads.items()
    }


def bench_rss(mib: int, d: Path, cold: Callable[[list[Path]], object]) -> dict[str, float]:
    """Peak RSS growth (MiB) while loading into a model, each in a fresh process, cold cache."""
    probes = {
        "torchkeep.load_into": d / "tk.safetensors",
        "torch.load": d / "torch.pt",
        "torch.load mmap": d / "torch.pt",
        "safetensors.load_file": d / "st.safetensors",
    }
    out = {}
    for how, path in probes.items():
        cold([path])
        result = subprocess.run(
            [sys.executable, "-c", RSS_PROBE, str(mib), str(path), how],
            capture_output=True,
            text=True,
            check=True,
        )
        out[how] = float(result.stdout.strip().splitlines()[-1])
    return out


def bench_hash(state: dict[str, torch.Tensor], repeat: int) -> dict[str, float]:
    """Hash throughput (bytes/s) over the tensors' bytes: torchkeep's xxh3-128 on one thread,
    and sha256 (the cryptographic reference) on one thread and one per core."""
    views = tensor_views(state)
    total = sum(v.nbytes for v in views)
    chunks = [v[i : i + 64 * MiB] for v in views for i in range(0, v.nbytes, 64 * MiB)]
    threads = os.cpu_count() or 1

    def xxh3() -> None:
        for v in views:
            xxhash.xxh3_128_hexdigest(v)

    def one() -> None:
        for v in views:
            hashlib.sha256(v).digest()

    def many() -> None:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda c: hashlib.sha256(c).digest(), chunks))

    return {
        "xxh3_128 1 thread (torchkeep)": total / median_time(xxh3, repeat),
        "sha256 1 thread": total / median_time(one, repeat),
        f"sha256 {threads} threads": total / median_time(many, repeat),
    }


def bench_size(
    mib: int, root: Path, repeat: int, cold: Callable[[list[Path]], object]
) -> dict[str, Any]:
    """Every save/load/RSS/hash measurement on one state of ``mib`` MiB."""
    state = make_model(mib).state_dict()
    nbytes = state_bytes(state)
    d = root / f"state-{mib}"
    d.mkdir(parents=True, exist_ok=True)
    try:
        saves = bench_saves(state, d, repeat)
        loads = bench_loads(d, repeat, cold)
        rss = bench_rss(mib, d, cold)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    hashing = bench_hash(state, repeat)
    return {
        "mib": mib,
        "bytes": nbytes,
        "save_seconds": {k: v["seconds"] for k, v in saves.items()},
        "save_stall_seconds": {k: v["stall"] for k, v in saves.items() if "stall" in v},
        "load_seconds": loads,
        "rss_growth_mib": rss,
        "hash_bytes_per_s": hashing,
        "write_bytes_per_s": nbytes / saves["raw os.write + fsync"]["seconds"],
    }


def ratios(res: dict[str, Any]) -> dict[str, float]:
    """The ratios printed for one size: throughput vs the raw write, times vs torch."""
    out: dict[str, float] = {}
    raw = res["save_seconds"]["raw os.write + fsync"]
    base_save = res["save_seconds"]["torch.save + fsync"]
    for name, s in res["save_seconds"].items():
        out[f"save throughput vs raw write: {name}"] = raw / s
        out[f"save time vs torch.save + fsync: {name}"] = s / base_save
    base_load = res["load_seconds"]["torch.load"]
    for name, s in res["load_seconds"].items():
        out[f"load time vs torch.load: {name}"] = s / base_load
    for name, grow in res["rss_growth_mib"].items():
        # floored at one 4 KiB page so that the ratio stays positive
        out[f"peak RSS growth / state size: {name}"] = max(grow, 4 / 1024) / res["mib"]
    for name, bps in res["hash_bytes_per_s"].items():
        out[f"hash throughput / write bandwidth: {name}"] = bps / res["write_bytes_per_s"]
    return out
