"""Ranks of the sharded (FSDP2) tests: ``python _fsdp_workers.py SCENARIO OUT_DIR`` with RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT set. Each rank writes ``rank<r>.json``.

Scenarios:
* ``save2`` (2 ranks): an FSDP2 model and Adam train 2 steps, saved through the manager at
  steps 0 and 1 (sharded); rank 0 writes the full state of step 1 to ``full1.safetensors``;
  rank 0 alone (``distributed=False``) is refused; then rank 1 is SIGKILLed inside its shard
  write of step 2;
* ``restore3`` (3 ranks): restore the latest checkpoint (step 1) into a fresh model at 3 ranks
  and write its full state to ``restored3.safetensors``; train a step and save step 2 with 3
  ranks asynchronously (its full state in ``full2.safetensors``), training on at once;
* ``big2`` (2 ranks): a 64 MiB FSDP2 model and a small one sharded by columns (``Shard(1)``,
  its full weight in ``columns.safetensors``) saved once (``big/``), for peak-memory tests.
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

import torchkeep as tk
from torchkeep.distributed import _dcp_writer


def model_of(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 6))


def build(seed: int) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    model = model_of(seed)
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    return {"model": model, "optimizer": opt, "rng": tk.RNGState(), "epoch": -1}


def train_step(app: dict[str, Any], step: int) -> None:
    x = torch.randn(4, 8)
    loss = app["model"](x).pow(2).mean()
    app["optimizer"].zero_grad()
    loss.backward()
    app["optimizer"].step()
    app["epoch"] = step


def full_state(app: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor of the model and optimizer, whole (a collective), flat keys."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.tensor import DTensor

    model_sd, optim_sd = get_state_dict(app["model"], app["optimizer"])
    out: dict[str, torch.Tensor] = {}
    for k, v in model_sd.items():
        out[f"model.{k}"] = v.full_tensor() if isinstance(v, DTensor) else v
    for fqn, entry in optim_sd["state"].items():
        for name, v in entry.items():
            out[f"optimizer.state.{fqn}.{name}"] = (
                v.full_tensor() if isinstance(v, DTensor) else v.clone()
            )
    return {k: v.detach().clone() for k, v in out.items()}


def save2(out: Path, rank: int) -> dict[str, Any]:
    result: dict[str, Any] = {}
    app = build(0)
    torch.manual_seed(100 + rank)
    mgr = tk.CheckpointManager(out / "run", keep_last=5, barrier_timeout=4)
    for step in (0, 1):
        train_step(app, step)
        mgr.save(step, app, metrics={"loss": 1.0 / (step + 1)})
    if rank == 0:  # shards need every rank: one rank alone is refused before any collective
        with tk.CheckpointManager(out / "alone", distributed=False) as alone:
            try:
                alone.save(0, app)
            except tk.InvalidArgumentError as exc:
                result["alone"] = str(exc)
    full = full_state(app)
    if rank == 0:
        tk.save(full, out / "full1.safetensors")
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    train_step(app, 2)
    if rank == 1:
        real = _dcp_writer.PackWriter._write_pack

        def dying(self: Any, tensors: Any) -> None:
            real(self, tensors)  # its shards are on disk; it dies before telling rank 0
            os.kill(os.getpid(), signal.SIGKILL)

        _dcp_writer.PackWriter._write_pack = dying  # type: ignore[method-assign]
    t0 = time.monotonic()
    try:
        mgr.save(2, app)
    except tk.DistributedError as exc:
        result["killed"] = [type(exc).__name__, str(exc), time.monotonic() - t0]
    return result


def restore3(out: Path, rank: int) -> dict[str, Any]:
    app = build(7)  # other weights: all must come from the checkpoint
    run = out / "run"
    with tk.CheckpointManager(run, barrier_timeout=60, rank_state="wrap", async_save=True) as mgr:
        info = mgr.restore(app)
        assert info is not None
        restored = full_state(app)
        if rank == 0:
            tk.save(restored, out / "restored3.safetensors")
        train_step(app, 2)
        full = full_state(app)
        if rank == 0:
            tk.save(full, out / "full2.safetensors")
        assert mgr.save(2, app) is None  # staged: written and committed in the background
        train_step(app, 3)  # changes the weights at once: the checkpoint keeps step 2's
        record = mgr.wait()
        committed = [r.step for r in mgr.checkpoints]
    return {
        "step": info.step,
        "epoch": app["epoch"],
        "record": record and record.step,
        "committed": committed,
    }


BIG_MIB = 64


def big2(out: Path, rank: int) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    side = 2048  # 4 layers of 2048 x 2048 float32 weights: 16 MiB each
    model = nn.Sequential(*(nn.Linear(side, side, bias=False) for _ in range(BIG_MIB // 16)))
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    # and a small model sharded by columns (tensor parallel style): chunks that are not rows
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    columns = nn.Linear(8, 6, bias=False)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    full = columns.weight.detach().clone()
    columns.weight = nn.Parameter(distribute_tensor(full, mesh, [Shard(1)]))
    if rank == 0:
        tk.save({"weight": full}, out / "columns.safetensors")
    with tk.CheckpointManager(out / "big", barrier_timeout=60) as mgr:
        mgr.save(0, {"model": model, "columns": columns})
    return {}


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    try:
        result = {"save2": save2, "restore3": restore3, "big2": big2}[scenario](out, rank)
    except BaseException:
        result = {"error": traceback.format_exc()}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    os._exit(0)  # no teardown collective with a dead peer


if __name__ == "__main__":
    main()
