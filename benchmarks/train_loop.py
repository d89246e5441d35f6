"""Training-loop benchmarks: checkpointing slowdown and stall, and fine-tuning write volume.

A model is trained for ``steps`` steps with a checkpoint every ``every`` steps. For each way of
saving we report the slowdown against no checkpointing (the final async write included), the
whole-loop overhead per save (loop time minus the same repeat's loop without checkpoints, over
the saves; median and spread of the repeats), the "stall": the time the loop is blocked inside
the save call (waiting for the previous save included) plus, for overlapped saves, the time the
hooks blocked the next steps, and the peak host memory above the loop's own (VmHWM, reset
before each run, minus the checkpoint-free loop's). The reference for a stall is copying the
state into buffers allocated once. Every way runs once per repeat, interleaved.

Usage: python benchmarks/train_loop.py [--mib 64] [--steps 60] [--every 15] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict

import torchkeep as tk

warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")

Saver = Callable[[int], None]


def _model(layers: int) -> torch.nn.Sequential:
    torch.manual_seed(0)
    mods: list[torch.nn.Module] = []
    for _ in range(layers):
        mods += [torch.nn.Linear(1024, 1024), torch.nn.ReLU()]
    return torch.nn.Sequential(*mods)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    opt.step()


def _state_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = [t.detach() for t in model.state_dict().values()]
    for s in opt.state.values():
        out += [v for v in s.values() if isinstance(v, torch.Tensor)]
    return out


def copy_time(model: torch.nn.Module, opt: torch.optim.Optimizer, repeat: int) -> float:
    """Median seconds to ``dst.copy_(src)`` every state tensor into buffers allocated once."""
    src = _state_tensors(model, opt)
    dst = [torch.empty_like(t) for t in src]
    for d, s in zip(dst, src, strict=True):
        d.copy_(s)  # fault the pages in once
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        for d, s in zip(dst, src, strict=True):
            d.copy_(s)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+)", f.read(), re.M)
    return int(match[1]) if match else 0


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5\n")
        return True
    except OSError:
        return False


def _make_saver(
    how: str,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    d: Path,
    hooks: list[Any],
    limit: int,
) -> tuple[Saver | None, Callable[[], None]]:
    """A save function for ``how`` and a function that finishes (waits for) the last save.

    Overlapped saves append their ``SnapshotStats`` to ``hooks`` (the hooks' block time)."""
    if how == "none":
        return None, lambda: None
    if how == "torch.save + fsync (sync)":

        def torch_save(step: int) -> None:
            with open(d / f"ckpt-{step}.pt", "wb") as f:
                torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, f)
                f.flush()
                os.fsync(f.fileno())

        return torch_save, lambda: None
    if how == "dcp.async_save":
        pending: list[Any] = []

        def dcp_save(step: int) -> None:
            if pending:
                pending.pop().result()  # DCP allows one save in flight, like torchkeep
            msd, osd = get_state_dict(model, opt)
            state = {"model": msd, "optim": osd}
            future = dcp.async_save(state, checkpoint_id=str(d / f"dcp-{step}"))  # type: ignore[attr-defined]
            pending.append(future)

        def dcp_finish() -> None:
            while pending:
                pending.pop().result()

        return dcp_save, dcp_finish
    overlap = "overlap" in how
    options: dict[str, Any] = {"async_save": how.endswith("(async)") or overlap}
    if overlap:
        options["overlap"] = True
    if "staging_limit" in how:
        options["staging_limit"] = limit
    mgr = tk.CheckpointManager(d / "run", keep_last=2, **options)
    app = {"model": model, "optimizer": opt}

    def tk_save(step: int) -> None:
        mgr.save(step, app)
        if overlap:
            hooks.append(mgr.snapshot_stats)

    return tk_save, mgr.close


def train(how: str, layers: int, steps: int, every: int, d: Path, limit: int = 0) -> dict[str, Any]:
    """One training run: seconds in total, the stall of every save (hooks included), the peak
    RSS growth in MiB."""
    model = _model(layers)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(32, 1024, generator=torch.Generator().manual_seed(1))
    _step(model, opt, x)  # optimizer state exists before the clock starts
    hooks: list[Any] = []
    save, finish = _make_saver(how, model, opt, d, hooks, limit)
    stalls: list[float] = []
    _reset_peak()
    rss = _status_kib("VmRSS")
    start = time.perf_counter()
    for step in range(1, steps + 1):
        _step(model, opt, x)
        if save is not None and step % every == 0:
            t0 = time.perf_counter()
            save(step)
            stalls.append(time.perf_counter() - t0)
    finish()
    seconds = time.perf_counter() - start
    hook_seconds = [s.hook_seconds if s is not None else 0.0 for s in hooks]
    if hook_seconds:
        stalls = [s + h for s, h in zip(stalls, hook_seconds, strict=True)]
    peak = (_status_kib("VmHWM") - rss) / 1024
    return {"seconds": seconds, "stalls": stalls, "hooks": hook_seconds, "peak_mib": peak}


HOWS = (
    "none",
    "torch.save + fsync (sync)",
    "dcp.async_save",
    "CheckpointManager (sync)",
    "CheckpointManager (async)",
    "CheckpointManager (overlap)",
    "CheckpointManager (overlap, staging_limit)",
)


def bench_train(root: Path, mib: int, steps: int, every: int, repeat: int) -> dict[str, Any]:
    """Slowdown and stalls of every way of saving, plus the copy-into-preallocated reference."""
    layers = max(1, mib // 4)
    model = _model(layers)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    _step(model, opt, torch.randn(32, 1024))
    tensors = _state_tensors(model, opt)
    state_mib = sum(t.numel() * t.element_size() for t in tensors) / 2**20
    copies = [copy_time(model, opt, 5)]
    limit = int(state_mib * 2**20) // 4  # a quarter of the state: four waves
    runs: dict[str, list[dict[str, Any]]] = {how: [] for how in HOWS}
    warm = root / "train-warmup"
    warm.mkdir(parents=True, exist_ok=True)
    train("none", layers, every, every, warm)  # warm-up: allocator, thread pools, first faults
    shutil.rmtree(warm, ignore_errors=True)
    for _ in range(repeat):
        for how in HOWS:  # interleaved, so that a change in machine load hits every way alike
            d = root / f"train-{HOWS.index(how)}"
            d.mkdir(parents=True, exist_ok=True)
            try:
                runs[how].append(train(how, layers, steps, every, d, limit))
            finally:
                shutil.rmtree(d, ignore_errors=True)
        copies.append(copy_time(model, opt, 5))
    copy = statistics.median(copies)
    base = statistics.median(r["seconds"] for r in runs["none"])
    out: dict[str, Any] = {
        "params_mib": layers * (1024 * 1024 + 1024) * 4 / 2**20,
        "state_mib": state_mib,
        "steps": steps,
        "every": every,
        "copy_into_preallocated_seconds": copy,
        "copy_spread_seconds": [min(copies), max(copies)],
        "staging_limit_mib": limit / 2**20,
        "saves_per_run": steps // every,
        "ways": {},
    }
    base_peak = statistics.median(r["peak_mib"] for r in runs["none"])
    for how, rs in runs.items():
        seconds = statistics.median(r["seconds"] for r in rs)
        first = [r["stalls"][0] for r in rs if r["stalls"]]
        steady = [s for r in rs for s in r["stalls"][1:]]
        saves = max(1, len(rs[0]["stalls"]))
        # Paired with the checkpoint-free run of the same repeat, which ran just before.
        overheads = [
            (r["seconds"] - n["seconds"]) / saves for r, n in zip(rs, runs["none"], strict=True)
        ]
        peaks = [r["peak_mib"] - base_peak for r in rs]
        hooks = [h for r in rs for h in r["hooks"][1:]]
        out["ways"][how] = {
            "seconds": seconds,
            "slowdown": seconds / base,
            "first_stall": statistics.median(first) if first else 0.0,
            "steady_stall": statistics.median(steady) if steady else 0.0,
            "steady_stall_spread": [min(steady), max(steady)] if steady else [0.0, 0.0],
            "hook_stall": statistics.median(hooks) if hooks else 0.0,
            "overhead_per_save": statistics.median(overheads),
            "overhead_spread": [min(overheads), max(overheads)],
            "peak_mib_above_loop": statistics.median(peaks),
        }
    return out


def bench_finetune(root: Path, layers: int = 20, saves: int = 3) -> dict[str, Any]:
    """Bytes of packs each checkpoint adds when only the last 10% of layers train."""
    model = _model(layers)
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    trainable = linears[-max(1, layers // 10) :]
    for m in linears:
        m.requires_grad_(m in trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3)  # no momentum: the trainable tensors are the state
    x = torch.randn(32, 1024)
    app = {"model": model, "optimizer": opt}
    trainable_bytes = sum(p.numel() * p.element_size() for p in params)
    total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    run = root / "finetune-run"
    packs = run / "packs"
    written: list[int] = []
    try:
        with tk.CheckpointManager(run) as mgr:
            mgr.save(0, app)
            for i in range(1, saves + 1):
                before = {p.name: p.stat().st_size for p in packs.iterdir()}
                for _ in range(2):
                    _step(model, opt, x)
                mgr.save(i, app)
                after = {p.name: p.stat().st_size for p in packs.iterdir()}
                written.append(sum(s for n, s in after.items() if n not in before))
    finally:
        shutil.rmtree(run, ignore_errors=True)
    return {
        "total_param_bytes": total_bytes,
        "trainable_bytes": trainable_bytes,
        "pack_bytes_per_save": written,
        "ratio": statistics.median(written) / trainable_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=64, help="parameter MiB (Adam state is 2x more)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=15)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = bench_train(Path(tmp), args.mib, args.steps, args.every, args.repeat)
        result["finetune"] = bench_finetune(Path(tmp))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
