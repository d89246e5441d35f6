"""Ranks of the distributed tests: ``python _workers.py SCENARIO OUT_DIR`` with RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set (as torchrun sets them). Each rank writes ``rank<r>.json``.

Scenarios:
* ``resume``: 2 ranks train a DDP model 6 steps, checkpointing at every step; then each rank
  builds a fresh model, optimizer and RNG, restores step 2 and trains to step 5 again: the
  weights must be bit-identical with those of the uninterrupted run;
  then they shard a model with FSDP2 and save it with plain ``dcp.save`` (``fsdp_dcp``);
* ``crash``: rank 0 of a run locked by another process fails, and rank 1 gets its error at once;
  then on a second run step 0 commits, rank 0 fails to save step 1 (an unstorable value), and
  rank 1 is SIGKILLed while saving step 2.
  At the end of ``resume``, rank 0 checkpoints alone (``alone``).
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import torchkeep as tk
from torchkeep.distributed import _ddp


def build(seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = DistributedDataParallel(nn.Linear(8, 4))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    return {"model": model, "optimizer": opt, "rng": tk.RNGState(), "step": -1}


def train_step(app: dict[str, Any], step: int) -> None:
    x = torch.randn(16, 8)  # from this rank's own RNG: per-rank state
    loss = app["model"](x).pow(2).mean()
    app["optimizer"].zero_grad()
    loss.backward()
    app["optimizer"].step()
    app["step"] = step


def weights(app: dict[str, Any]) -> list[list[float]]:
    return [p.detach().flatten().tolist() for p in app["model"].parameters()]


def resume(out: Path, rank: int) -> dict[str, Any]:
    run = out / "run"
    app = build(0)
    torch.manual_seed(100 + rank)  # each rank draws other data
    with tk.CheckpointManager(run, keep_last=10, barrier_timeout=60) as mgr:
        assert mgr.restore(app) is None  # a fresh run on every rank: no race, no lock error
        for step in range(6):
            train_step(app, step)
            record = mgr.save(step, app)
            assert record is not None and record.step == step
    reference = weights(app)
    app = build(1)  # other weights, other RNG: everything must come from the checkpoint
    torch.manual_seed(999)
    with tk.CheckpointManager(run, barrier_timeout=60) as mgr:
        info = mgr.restore(app, 2)
        assert info is not None and app["step"] == 2
        for step in range(3, 6):
            train_step(app, step)
    resumed = weights(app)
    with tk.CheckpointManager(out / "async", async_save=True, barrier_timeout=60) as mgr:
        for step in range(3):  # save returns once staged; rank 0 commits in the background
            train_step(app, step)
            assert mgr.save(step, app) is None
        record = mgr.wait()
        steps = [r.step for r in mgr.checkpoints]
    return {
        "reference": reference,
        "resumed": resumed,
        "async": [record.step if record else None, steps],
        "fsdp": fsdp_dcp(out, rank),  # same processes: one launch less
        "alone": alone(out) if rank == 0 else {},
    }


def alone(out: Path) -> dict[str, Any]:
    """Rank 0 alone checkpoints (rank 1 builds no manager): with ``distributed=False`` it just
    works; without, its first save fails naming rank 1, and close() does not wait again."""
    app = {"model": nn.Linear(8, 4), "rng": tk.RNGState(), "step": 0}
    t0 = time.monotonic()
    with tk.CheckpointManager(out / "alone", distributed=False, barrier_timeout=60) as mgr:
        mgr.save(0, app)
        mgr.save(1, app)
    result: dict[str, Any] = {"seconds": time.monotonic() - t0}
    t0 = time.monotonic()
    try:
        with tk.CheckpointManager(out / "forgot", barrier_timeout=3) as mgr:
            mgr.save(0, app)
    except tk.DistributedError as exc:
        result["forgot"] = [str(exc), time.monotonic() - t0]
    return result


def crash(out: Path, rank: int) -> dict[str, Any]:
    result: dict[str, Any] = {}
    app = build(0)
    t0 = time.monotonic()
    try:
        tk.CheckpointManager(out / "locked", barrier_timeout=60)
    except tk.TorchkeepError as exc:
        result["locked"] = [type(exc).__name__, str(exc), time.monotonic() - t0]
    mgr = tk.CheckpointManager(out / "run", barrier_timeout=4)
    train_step(app, 0)
    mgr.save(0, app)
    result["saved0"] = weights(app)
    t0 = time.monotonic()
    try:  # rank 0 cannot store its app: rank 1 hears of it at once
        mgr.save(1, {**app, "bad": object()} if rank == 0 else app)
    except tk.TorchkeepError as exc:
        result["bad"] = [type(exc).__name__, str(exc), time.monotonic() - t0]
    train_step(app, 1)
    (out / f"rank{rank}.json").write_text(json.dumps(result))  # rank 1 dies below
    if rank == 1:
        real = _ddp._write_part

        def dying(*args: Any) -> Any:
            real(*args)  # its pack is written; it dies before telling rank 0
            os.kill(os.getpid(), signal.SIGKILL)

        _ddp._write_part = dying  # type: ignore[assignment]
    t0 = time.monotonic()
    try:
        mgr.save(2, app)
    except tk.DistributedError as exc:
        result["killed"] = [type(exc).__name__, str(exc), time.monotonic() - t0]
    return result


def fsdp_dcp(out: Path, rank: int) -> dict[str, Any]:
    """FSDP2 (fully_shard, gloo on CPU) shards saved with plain dcp.save: one chunk per rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 6))
    if rank == 0:
        tk.save(model.state_dict(), out / "full.safetensors")
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    state = get_model_state_dict(model)
    local = {k: list(v.to_local().shape) for k, v in state.items()}
    dcp.save({"model": state}, checkpoint_id=str(out / "dcp"))
    return {"local": local}


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    try:
        result = {"resume": resume, "crash": crash}[scenario](out, rank)
    except BaseException:
        result = {"error": traceback.format_exc()}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    os._exit(0)  # no teardown collective with a dead peer


if __name__ == "__main__":
    main()
