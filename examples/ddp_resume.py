"""Distributed training with torchkeep: two DDP processes train and checkpoint; one resumes.

Every rank builds the same ``CheckpointManager`` and calls ``save``: rank 0 writes the model
(unwrapped, so it loads without DDP) and commits; each rank's RNG and data order are stored per
rank. Then a single process (world size 1) resumes from the last checkpoint, under an explicit
per-rank policy: ``rank_state="wrap"`` gives it rank 0's RNG.

Run: python examples/ddp_resume.py [WORKDIR]
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

import torchkeep as tk

STEPS = 4


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    return TensorDataset(x, x.sum(dim=1, keepdim=True))


def make_app(model: nn.Module, rank: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1 + rank)  # each rank shuffles its own way
    loader = DataLoader(dataset(), batch_size=8, shuffle=True, generator=g)
    return {
        "model": model,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.05),
        "rng": tk.RNGState(),
        "loader": loader,
        "step": -1,
    }


def train(rank: int, world_size: int, run: str, port: int) -> None:
    torch.set_num_threads(1)  # two ranks share the cores of this machine
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60)
    )
    torch.manual_seed(0)  # the same initial weights on every rank
    app = make_app(DistributedDataParallel(nn.Linear(8, 1)), rank)
    with tk.CheckpointManager(run, keep_last=2, barrier_timeout=60) as mgr:
        info = mgr.restore(app)  # None: a fresh run (every rank sees it, no lock error)
        start = info.step + 1 if info else 0
        batches = iter(app["loader"])
        for step in range(start, STEPS):
            x, y = next(batches)
            loss = nn.functional.mse_loss(app["model"](x), y)
            app["optimizer"].zero_grad()
            loss.backward()
            app["optimizer"].step()
            app["step"] = step
            mgr.save(step, app, metrics={"loss": loss.item()})
    if rank == 0:
        print(f"2 ranks trained steps 0..{STEPS - 1}, last loss {loss.item():.4f}")
    dist.destroy_process_group()


def main() -> None:
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    run = str(work / "run")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the children start at once, without importing torch again
    mp.start_processes(train, args=(2, run, port), nprocs=2, join=True, start_method="fork")

    # One process resumes the run that two wrote: same model, no DDP, world size 1.
    torch.manual_seed(123)  # other weights: the checkpoint must replace them
    app = make_app(nn.Linear(8, 1), rank=0)
    with tk.CheckpointManager(run, rank_state="wrap") as mgr:
        info = mgr.restore(app)
        assert info is not None
        print(f"resumed at step {info.step} with 1 process (saved by 2 ranks)")
        saved = tk.load(f"{run}@latest")
        same = torch.equal(app["model"].weight, saved["model"]["weight"])
        print(f"weights equal to the checkpoint's: {'yes' if same else 'no'}")
        print(f"verify: {'OK' if tk.verify(run).ok else 'DAMAGED'}")


if __name__ == "__main__":
    main()
