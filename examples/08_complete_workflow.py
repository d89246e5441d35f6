"""Tutorial chapter 8, a complete workflow, the torchkeep way.

Train and validate a small classifier with dropout, a learning-rate schedule and a shuffling
DataLoader; checkpoint every epoch with metrics and metadata. The training stops after 3 epochs
(its process exits), a new process resumes at the 4th and finishes, and the result is compared
with an uninterrupted run of the same script: the same weights bit for bit and the same
metrics. The plain tutorial checkpoint (model, optimizer, epoch, loss) would resume with another
shuffle order, other dropout masks and a reset scheduler. Then: reload the best model, predict,
plot the curves (matplotlib, to a PNG).

Run: python examples/08_complete_workflow.py [WORKDIR]
"""

from __future__ import annotations

import multiprocessing
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchkeep as tk

EPOCHS = 6
STOP_AFTER = 3


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(10, 64),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, 3),
    )


def datasets() -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(600, 10, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] + x[:, 2] > 0.5).long()
    return TensorDataset(x[:480], y[:480]), TensorDataset(x[480:], y[480:])


def validate(model: nn.Module, data: TensorDataset) -> tuple[float, float]:
    model.eval()
    x, y = data.tensors
    with torch.no_grad():
        logits = model(x)
    model.train()
    loss = float(nn.functional.cross_entropy(logits, y))
    return loss, float((logits.argmax(1) == y).float().mean())


def train(run: Path, stop_after: int | None = None) -> None:
    """Train to EPOCHS, resuming from ``run`` if it has a checkpoint; exit after ``stop_after``."""
    torch.set_num_threads(1)
    random.seed(0)  # every generator the run uses is seeded, and all of them are checkpointed
    np.random.seed(0)
    torch.manual_seed(0)
    train_set, val_set = datasets()
    loader = DataLoader(train_set, batch_size=32, shuffle=True, generator=torch.Generator())
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    app = {
        "model": model,
        "optimizer": opt,
        "scheduler": sched,
        "loader": loader,  # its generator: the shuffle order of the next epoch
        "rng": tk.RNGState(),  # python, numpy, torch CPU (and CUDA) generators: dropout masks
        "epoch": 0,
    }
    with tk.CheckpointManager(run, keep_last=3, keep_best=1, monitor="val_loss") as mgr:
        info = mgr.restore(app)
        start = info.step + 1 if info else 0
        if info:
            print(f"[{run.name}] resumed from epoch {info.step}, lr {sched.get_last_lr()[0]:.5f}")
        for epoch in range(start, EPOCHS):
            total = 0.0
            for x, y in loader:
                loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(x)
            sched.step()
            val_loss, val_acc = validate(model, val_set)
            app["epoch"] = epoch
            metrics = {
                "train_loss": total / len(train_set),
                "val_loss": val_loss,
                "val_acc": val_acc,
            }
            metadata = {"lr": 3e-3, "batch_size": 32, "pytorch_version": torch.__version__}
            mgr.save(epoch, app, metrics=metrics, metadata=metadata)
            print(
                f"[{run.name}] epoch {epoch}: train_loss {metrics['train_loss']:.4f} "
                f"val_loss {val_loss:.4f} val_acc {val_acc:.3f}"
            )
            if stop_after is not None and epoch + 1 == stop_after:
                print(f"[{run.name}] stopping after {stop_after} epochs")
                return


def plain_resume(run: Path) -> dict[str, torch.Tensor]:
    """The tutorial's resume: model and optimizer from epoch STOP_AFTER - 1, nothing else."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    train_set, _ = datasets()
    loader = DataLoader(train_set, batch_size=32, shuffle=True, generator=torch.Generator())
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    state = tk.load(f"{run}@{STOP_AFTER - 1}")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    for _ in range(STOP_AFTER, EPOCHS):
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return model.state_dict()


def in_new_process(run: Path, stop_after: int | None = None) -> None:
    process = multiprocessing.get_context("spawn").Process(target=train, args=(run, stop_after))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise SystemExit(f"training process for {run} failed with exit code {process.exitcode}")


def plot(history: list[dict[str, Any]], best_step: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    for name in ("train_loss", "val_loss"):
        ax_loss.plot(steps, [h["metrics"][name] for h in history], marker="o", label=name)
    ax_loss.axvline(best_step, color="grey", linestyle="--", label="best")
    ax_loss.axvline(STOP_AFTER - 0.5, color="red", linestyle=":", label="stopped, resumed")
    ax_acc.plot(steps, [h["metrics"]["val_acc"] for h in history], marker="o", label="val_acc")
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("epoch")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(workdir: Path) -> None:
    resumed, uninterrupted = workdir / "run", workdir / "run-uninterrupted"
    print(f"== train, stop after {STOP_AFTER} epochs (the process exits)")
    in_new_process(resumed, stop_after=STOP_AFTER)
    plain = plain_resume(resumed)  # for comparison, below
    print(f"== resume at epoch {STOP_AFTER + 1} in a new process")
    in_new_process(resumed)
    print("== the same training, uninterrupted, for comparison")
    train(uninterrupted)  # here, in this process: every generator is seeded in train()

    print("== resumed against uninterrupted")
    report = tk.diff(f"{resumed}@latest", f"{uninterrupted}@latest")
    print(f"tk.diff(run@latest, run-uninterrupted@latest): {report.summary}")
    with tk.CheckpointManager(resumed, read_only=True) as a:
        history, best = a.history, a.best
    with tk.CheckpointManager(uninterrupted, read_only=True) as b:
        other = b.history
    same_metrics = [(h["step"], h["metrics"]) for h in history] == [
        (h["step"], h["metrics"]) for h in other
    ]
    identical = not report.changed and not report.added and not report.removed
    print(f"resumed equals uninterrupted bit for bit: {'yes' if identical else 'NO'}")
    print(f"metric histories equal: {'yes' if same_metrics else 'NO'}")

    final = tk.load(f"{uninterrupted}@latest")["model"]
    plain_same = all(torch.equal(plain[k], v) for k, v in final.items())
    print(
        "plain resume (model + optimizer + epoch only) equals uninterrupted: "
        f"{yesno(plain_same)} (shuffle order, dropout masks and the schedule start over)"
    )

    print("== reload the best checkpoint, predict")
    assert best is not None
    print(f"best: epoch {best.step}, {best.metrics}, metadata {best.metadata}")
    model = make_model()
    print(tk.load_into(model, f"{resumed}@best"))
    model.eval()
    _, val_set = datasets()
    x, y = val_set.tensors
    with torch.no_grad():
        predictions = model(x).argmax(1)
    accuracy = float((predictions == y).float().mean())
    print(f"predictions for 5 samples: {predictions[:5].tolist()}, val accuracy {accuracy:.3f}")
    print(
        f"reloaded accuracy equals the recorded val_acc: {yesno(accuracy == best.metrics['val_acc'])}"
    )

    print("== plot the curves")
    plot(history, best.step, workdir / "curves.png")
    print(f"wrote {workdir / 'curves.png'} ({(workdir / 'curves.png').stat().st_size} bytes)")


def yesno(flag: bool) -> str:
    return "yes" if flag else "NO"


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
