"""Tutorial chapter 7, checkpoints of DataParallel and DDP training, the torchkeep way.

A wrapped model's state dict has every key prefixed with ``module.``: the plain
``load_state_dict`` of an unwrapped model refuses it ("Missing key(s) ... Unexpected key(s)
module.0.weight"), and the usual fix is a hand-written ``k[7:]``. ``tk.load_into`` strips the
prefix, or adds it when the model is the wrapped one, and says so in its report.

DDP runs here in real processes (``torch.multiprocessing``, the gloo backend on CPU): two ranks
train, rank 0 writes a portable checkpoint (no prefix, no pickle, the world size as a plain value)
while the others wait at a barrier; then three ranks (another "GPU count") load it, each into
its own DDP-wrapped model, and check they all hold the saved weights and predict the same.

Run: python examples/07_distributed_training.py [WORKDIR]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import torchkeep as tk

STEPS = 5


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))


def probe() -> torch.Tensor:
    return torch.linspace(-1, 1, 24).reshape(3, 8)


def setup(rank: int, world_size: int, rendezvous: Path) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size
    )


def teardown(rank: int, world_size: int, marks: Path) -> None:
    """Leave the group in order: the other ranks first, then rank 0.

    A gloo rank whose peer is already gone can abort in ``destroy_process_group`` ("terminate
    called without an active exception"), so rank 0 waits until every other rank has left.
    """
    marks.mkdir(exist_ok=True)
    dist.barrier()
    if rank != 0:
        dist.destroy_process_group()
        (marks / f"left-{rank}").touch()
        return
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all(
        (marks / f"left-{r}").exists() for r in range(1, world_size)
    ):
        time.sleep(0.02)
    dist.destroy_process_group()


def train_worker(rank: int, world_size: int, workdir: Path) -> None:
    """DDP training on 2 ranks; rank 0 saves a portable checkpoint, the others wait for it."""
    setup(rank, world_size, workdir / "rendezvous-train")
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts them)
    ddp = DDP(make_model())
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    data = torch.Generator().manual_seed(100 + rank)  # each rank its own shard
    for _ in range(STEPS):
        x, y = torch.randn(16, 8, generator=data), torch.randn(16, 2, generator=data)
        loss = nn.functional.mse_loss(ddp(x), y)
        opt.zero_grad()
        loss.backward()  # gradients are averaged across ranks here
        opt.step()
    if rank == 0:
        # ddp.state_dict() has "module." keys; ddp.module's state dict is the portable one.
        tk.save(ddp.state_dict(), workdir / "ddp_raw.safetensors")
        tk.save(
            {
                "model": ddp.module.state_dict(),
                "optimizer": opt.state_dict(),
                "step": STEPS,
                "world_size": world_size,
            },
            workdir / "portable.safetensors",
            metadata={"world_size": world_size},
        )
        with torch.no_grad():
            tk.save({"predictions": ddp.module(probe())}, workdir / "expected.safetensors")
        print(
            f"[train] rank 0 of {world_size}: saved after {STEPS} steps, loss {float(loss.detach()):.4f}"
        )
    teardown(rank, world_size, workdir / "rendezvous-train.d")  # after rank 0 has written


def load_worker(rank: int, world_size: int, workdir: Path) -> None:
    """Three ranks load the 2-rank checkpoint into DDP-wrapped models and compare."""
    setup(rank, world_size, workdir / "rendezvous-load")
    torch.manual_seed(rank)  # different fresh weights per rank: the load must overwrite them
    model = make_model()
    report = tk.load_into(model, workdir / "portable.safetensors")
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    state = tk.load(workdir / "portable.safetensors")
    opt.load_state_dict(state["optimizer"])
    with torch.no_grad():
        mine = ddp(probe())
    expected = tk.load(workdir / "expected.safetensors")["predictions"]
    gathered = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(gathered, mine)
    also = DDP(make_model())
    wrapped = tk.load_into(also, workdir / "portable.safetensors")  # adds "module." itself
    if rank == 0:
        print(f"[load] world size {world_size}, checkpoint from world size {state['world_size']}")
        print(f"[load] rank 0: {report}")
        print(f"[load] into a DDP-wrapped model: {'; '.join(wrapped.renamed)}")
        same = all(torch.equal(g, expected) for g in gathered)
        print(f"[load] all {world_size} ranks predict what the saved model did: {yesno(same)}")
    teardown(rank, world_size, workdir / "rendezvous-load.d")


def main(workdir: Path) -> None:
    print("== DataParallel: the module. prefix")
    torch.manual_seed(0)
    dp = nn.DataParallel(make_model())  # runs on CPU too (no device ids): same state dict keys
    tk.save(dp.state_dict(), workdir / "dataparallel.safetensors")
    print(f"DataParallel keys: {list(dp.state_dict())[:2]} ...")
    plain = make_model()
    try:
        plain.load_state_dict(tk.load(workdir / "dataparallel.safetensors"))
    except RuntimeError as err:
        print(f"plain load_state_dict: RuntimeError: {' '.join(str(err).split())[:110]}...")
    report = tk.load_into(plain, workdir / "dataparallel.safetensors")
    print(f"tk.load_into: {report}")
    same = torch.equal(plain(probe()), dp.module(probe()))
    print(f"unwrapped model predicts what the DataParallel one does: {yesno(same)}")

    print("== DDP, 2 processes (gloo on CPU): train, rank 0 saves")
    mp.spawn(train_worker, args=(2, workdir), nprocs=2, join=True)
    raw = tk.inspect(workdir / "ddp_raw.safetensors")
    portable = tk.inspect(workdir / "portable.safetensors")
    print(f"ddp.state_dict() keys: {[t.name for t in raw.tensors][:2]} ...")
    print(f"portable checkpoint keys: {[t.name for t in portable.tensors][:2]} ...")
    print(f"portable checkpoint values: {portable.values}")

    print("== another world size: 3 processes load the 2-process checkpoint")
    mp.spawn(load_worker, args=(3, workdir), nprocs=3, join=True)

    print("== one process, no DDP at all: the same checkpoint")
    single = make_model()
    print(
        f"tk.load_into(raw DDP state dict): {tk.load_into(single, workdir / 'ddp_raw.safetensors')}"
    )
    expected = tk.load(workdir / "expected.safetensors")["predictions"]
    with torch.no_grad():
        same = torch.equal(single(probe()), expected)
    print(f"single process predicts what rank 0 saved: {yesno(same)}")


def yesno(flag: bool) -> str:
    return "yes" if flag else "NO"


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
