"""Tutorial chapter 2, checkpointing during training, the torchkeep way.

The classic tutorials keep the best model with ``best_state = copy.deepcopy(model.state_dict())``
(a second copy of the weights in memory, lost when the process dies) and write ``torch.save``
files by hand (no retention, no atomicity). A ``CheckpointManager`` does:

1. best-model tracking by a monitored metric, on disk;
2. retention rules (keep the last N, the best K), the latest and the best never deleted;
3. resume from any kept checkpoint (``latest``, ``best`` or a step);
4. listing (``mgr.checkpoints``, ``torchkeep ls``) and inspecting (``tk.inspect``).

Run: python examples/02_checkpoint_manager.py [WORKDIR]
"""

from __future__ import annotations

import copy
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import torchkeep as tk


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 1))


def epoch_of(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> None:
    for _ in range(4):  # four passes over a small training set: it overfits after epoch 2
        for i in range(0, len(x), 16):
            loss = nn.functional.mse_loss(model(x[i : i + 16]), y[i : i + 16])
            opt.zero_grad()
            loss.backward()
            opt.step()


def validate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(nn.functional.mse_loss(model(x), y))


def main(workdir: Path) -> None:
    torch.manual_seed(0)
    w = torch.randn(4, 1)
    x = torch.randn(32, 4)
    y = x @ w + 0.8 * torch.randn(32, 1)
    vx = torch.randn(64, 4)
    vy = vx @ w + 0.8 * torch.randn(64, 1)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    app = {"model": model, "optimizer": opt, "epoch": 0}
    run = workdir / "run"

    # The tutorial way: a deepcopy of the best state dict, in memory only.
    best_loss, best_state = float("inf"), None
    val_losses: dict[int, float] = {}
    with tk.CheckpointManager(run, keep_last=2, keep_best=1, monitor="val_loss") as mgr:
        for epoch in range(8):
            epoch_of(model, opt, x, y)
            val = validate(model, vx, vy)
            val_losses[epoch] = val
            if val < best_loss:
                best_loss, best_state = val, copy.deepcopy(model.state_dict())
            app["epoch"] = epoch
            mgr.save(epoch, app, metrics={"val_loss": val})  # the torchkeep way
        print("== 1. best-model tracking")
        best = mgr.best
        assert best is not None and best_state is not None
        print(f"val_loss per epoch: {', '.join(f'{e}:{v:.4f}' for e, v in val_losses.items())}")
        print(f"best by the manager: step {best.step}, val_loss {best.metrics['val_loss']:.4f}")
        best_model = make_model()
        tk.load_into(best_model, f"{run}@best")
        same = all(torch.equal(best_model.state_dict()[k], v) for k, v in best_state.items())
        print(f"RUN@best equals the deepcopy of the best state dict: {'yes' if same else 'NO'}")

        print("== 2. retention: keep_last=2, keep_best=1")
        kept = [c.step for c in mgr.checkpoints]
        print(f"kept steps: {kept}, 8 saved")
        for c in mgr.checkpoints:
            print(f"  step {c.step}: {', '.join(c.kept)}, {c.size} bytes")
        latest = mgr.latest
        assert latest is not None

    print("== 3. resume from any checkpoint")
    for which in ("latest", "best", kept[0]):
        fresh = make_model()
        fresh_app = {"model": fresh, "optimizer": torch.optim.Adam(fresh.parameters(), lr=2e-2)}
        fresh_app["epoch"] = -1
        with tk.CheckpointManager(run, read_only=True) as reader:
            info = reader.restore(fresh_app, which)
        assert info is not None
        val = validate(fresh, vx, vy)
        match = val == val_losses[info.step]
        print(
            f"restore({which!r}): step {info.step}, epoch value {fresh_app['epoch']}, "
            f"val_loss {val:.4f} reproduced: {'yes' if match else 'NO'}"
        )

    print("== 4. listing and inspecting")
    listing = subprocess.run(
        [sys.executable, "-m", "torchkeep", "ls", str(run)], capture_output=True, text=True
    )
    print(listing.stdout.rstrip())
    info = tk.inspect(f"{run}@best")
    print(f"tk.inspect(RUN@best): format {info.format}, {len(info.tensors)} tensors")
    print(f"  values: {info.values}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
