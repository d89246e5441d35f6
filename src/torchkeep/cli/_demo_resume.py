"""The checkpoint-run steps of ``torchkeep demo``: stop, resume, compare, list and plot.

The demo's model is trained again with a :class:`torchkeep.CheckpointManager` (a checkpoint at
the end of every epoch, ``keep_last=2, keep_best=1`` by ``val_loss``) and an app holding the
model, Adam, a ``StepLR`` scheduler, ``tk.RNGState()`` and the epoch. The training runs in a new
Python process that stops after epoch 3 of 5, as a crash or a preempted job would; a second new
process resumes the run from its latest checkpoint and finishes it. The same 5 epochs are then
trained without interruption in another directory, and both runs must end bit-identical.

Each epoch's shuffle order and dropout masks come from torch's global generator, so the resume
is exact only because ``RNGState`` brings that generator back.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import torchkeep as tk
from torchkeep.cli._demo_common import DemoRun
from torchkeep.cli._demo_model import DemoMLP, make_data, train_epoch
from torchkeep.cli._errors import fail
from torchkeep.cli._output import human_bytes, print_kv, print_line
from torchkeep.cli._plot import write_plot
from torchkeep.cli._run import render_run
from torchkeep.storage import storage_for

__all__ = [
    "IDENTITY_LINE",
    "TrainSpec",
    "child_main",
    "spawn",
    "step_compare",
    "step_ls",
    "step_plot",
    "step_resume",
    "step_stop",
    "train",
]

IDENTITY_LINE = "resumed run identical to the uninterrupted run"
_CHILD = (
    "import sys; from torchkeep.cli._demo_resume import child_main; "
    "sys.exit(child_main(sys.argv[1:]))"
)
_TIMEOUT_S = 300


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainSpec:
    """One invocation of :func:`train`: where, how long, and when to stop."""

    run_dir: str
    epochs: int
    stop_after: int | None
    seed: int
    hparams: dict[str, Any]


def stop_epoch(epochs: int) -> int:
    """The epoch after which the interrupted run stops: 3 of 5, always at least one left."""
    return max(1, min(epochs - 1, round(epochs * 3 / 5)))


def managed_epochs(run: DemoRun) -> int:
    """Epochs of the managed runs: the demo's ``--epochs``, at least 2 (to stop in between)."""
    return max(run.epochs, 2)


# ---------------------------------------------------------------------------------------------
# the training script, run in new processes (and in-process for the uninterrupted run)


def train(spec: TrainSpec, out: Callable[[str], None]) -> None:
    """Train the demo model with a CheckpointManager, resuming from the run's latest checkpoint.

    Args:
        spec: the run directory, the number of epochs, the epoch to stop after (``None``: train
            to the end), the seed and the hyperparameters.
        out: called with each line of progress.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-identical results need the same reduction order everywhere
    try:
        h = spec.hparams
        # Every generator RNGState saves starts seeded, so that all processes start alike.
        random.seed(spec.seed)
        np.random.seed(spec.seed)
        torch.manual_seed(spec.seed)
        data = make_data(spec.seed)
        model = DemoMLP(
            in_features=data.in_features,
            hidden=int(h["hidden"]),
            out_features=data.num_classes,
            dropout=float(h["dropout"]),
        )
        optimizer = torch.optim.Adam(model.parameters(), lr=float(h["lr"]))
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        app: dict[str, Any] = {
            "model": model,
            "optimizer": optimizer,
            "scheduler": scheduler,
            "rng": tk.RNGState(),
            "epoch": 0,  # epochs done
        }
        with tk.CheckpointManager(
            spec.run_dir, keep_last=2, keep_best=1, monitor="val_loss", mode="min"
        ) as mgr:
            info = mgr.restore(app)
            if info is None:
                out("no checkpoint yet: training from scratch")
            else:
                out(f"restored step {info.step} (model, Adam, StepLR, RNG, epoch={app['epoch']})")
            for epoch in range(int(app["epoch"]) + 1, spec.epochs + 1):
                lr = optimizer.param_groups[0]["lr"]
                # The shuffle order is drawn from torch's global generator, like dropout:
                # RNGState restores it.
                batch = int(h["batch_size"])
                train_loss, val_loss, val_acc = train_epoch(model, optimizer, data, batch)
                scheduler.step()
                app["epoch"] = epoch
                metrics = {"train_loss": train_loss, "val_loss": val_loss, "val_acc": val_acc}
                mgr.save(epoch, app, metrics=metrics)
                out(
                    f"epoch {epoch}/{spec.epochs}  lr {lr:.4g}  train_loss {train_loss:.4f}  "
                    f"val_loss {val_loss:.4f}  val_acc {val_acc:.3f}  -> checkpoint step {epoch}"
                )
                if epoch == spec.stop_after:
                    out(f"stopping after epoch {epoch} of {spec.epochs}, as a crash would")
                    break
    finally:
        torch.set_num_threads(threads)


def child_main(argv: list[str]) -> int:
    """Entry point of a training process: ``argv[0]`` is a :class:`TrainSpec` as JSON."""
    spec = TrainSpec(**json.loads(argv[0]))
    try:
        train(spec, lambda line: print(line, flush=True))
    except tk.TorchkeepError as err:
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


def spawn(spec: TrainSpec) -> tuple[int, list[str]]:
    """Run :func:`train` in a new Python process; returns its pid and its lines of output.

    Raises:
        typer.Exit: the process failed or timed out (its stderr is shown).
    """
    env = dict(os.environ)
    # The child imports this very torchkeep, whether installed or run from a source tree.
    source = str(Path(tk.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source, env.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, json.dumps(asdict(spec))],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        stdout, stderr = proc.communicate(timeout=_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        fail(f"the training process did not finish within {_TIMEOUT_S} s")
    if proc.returncode != 0:
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        fail(f"the training process failed (exit code {proc.returncode}):\n{tail}")
    return proc.pid, stdout.splitlines()


# ---------------------------------------------------------------------------------------------
# the demo's steps


def _fresh_run_dir(path: Path) -> None:
    """Remove a previous demo's run at ``path``; refuse to delete anything else."""
    if not path.exists():
        return
    try:
        tk.CheckpointManager(path, read_only=True).close()
    except tk.TorchkeepError:
        fail(f"{path} exists and is not a torchkeep run: choose another --workdir")
    storage_for(path).remove_tree(str(path))  # a run of the demo's own: start afresh


def _spec(run: DemoRun, path: Path, stop_after: int | None) -> TrainSpec:
    return TrainSpec(
        run_dir=str(path),
        epochs=managed_epochs(run),
        stop_after=stop_after,
        seed=run.seed,
        hparams=dict(run.hparams),
    )


def _in_new_process(spec: TrainSpec) -> None:
    pid, lines = spawn(spec)
    print_line(f"new Python process (pid {pid}):")
    for line in lines:
        print_line(f"  {line}")


def _steps_of(path: Path) -> str:
    with tk.CheckpointManager(path, read_only=True) as mgr:
        return ", ".join(str(r.step) for r in mgr.checkpoints) or "none"


def step_stop(run: DemoRun) -> None:
    """Train in a new process with a CheckpointManager; the process stops after epoch 3 of 5."""
    _fresh_run_dir(run.run_dir)
    _fresh_run_dir(run.straight_dir)
    epochs = managed_epochs(run)
    print_line(
        f"tk.CheckpointManager({run.run_dir.name!r}, keep_last=2, keep_best=1, "
        f"monitor='val_loss', mode='min'), a checkpoint every epoch"
    )
    print_line("app = {model, optimizer: Adam, scheduler: StepLR, rng: tk.RNGState(), epoch}")
    _in_new_process(_spec(run, run.run_dir, stop_epoch(epochs)))
    print_line(f"checkpoints in {run.run_dir.name}/: steps {_steps_of(run.run_dir)}")


def step_resume(run: DemoRun) -> None:
    """Resume the run in another new process, from its latest checkpoint, to the last epoch."""
    _in_new_process(_spec(run, run.run_dir, None))
    print_line(f"checkpoints in {run.run_dir.name}/: steps {_steps_of(run.run_dir)}")


def _difference(a: Any, b: Any, where: str = "") -> str | None:
    """Where two loaded states first differ (``None``: equal, tensors bit for bit)."""
    here = where or "(root)"
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
        return None if same else here
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if list(a) != list(b):
            return f"{here} (keys)"
        for key in a:
            found = _difference(a[key], b[key], f"{where}.{key}" if where else str(key))
            if found:
                return found
        return None
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return f"{here} (length)"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            found = _difference(x, y, f"{where}[{i}]")
            if found:
                return found
        return None
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return None if np.array_equal(a, b) else here
    return None if type(a) is type(b) and a == b else here


def step_compare(run: DemoRun) -> None:
    """Train the same epochs uninterrupted (in this process) and compare both final states."""
    epochs = managed_epochs(run)
    print_line(f"this process, {epochs} epochs without interruption into {run.straight_dir.name}/:")
    train(_spec(run, run.straight_dir, None), lambda line: print_line(f"  {line}"))
    resumed = tk.load(f"{run.run_dir}@latest")
    straight = tk.load(f"{run.straight_dir}@latest")
    weights = _difference(resumed["model"], straight["model"])
    rest = _difference(
        {k: v for k, v in resumed.items() if k != "model"},
        {k: v for k, v in straight.items() if k != "model"},
    )
    with (
        tk.CheckpointManager(run.run_dir, read_only=True) as a,
        tk.CheckpointManager(run.straight_dir, read_only=True) as b,
    ):
        history = [r["metrics"] for r in a.history] == [r["metrics"] for r in b.history]
    n = len(resumed["model"])
    print_line()
    print_kv(
        [
            ("final weights (state dict)", _verdict(weights, f"{n} tensors, torch.equal: yes")),
            ("optimizer, scheduler, RNG, epoch", _verdict(rest, "identical: yes")),
            ("metrics of every epoch", "identical: yes" if history else "differ: NO"),
        ],
        title=f"{run.run_dir.name} (stopped, resumed) vs {run.straight_dir.name}",
    )
    run.resumed_exactly = weights is None and rest is None and history
    print_line()
    print_line(f"{IDENTITY_LINE}: {'yes' if run.resumed_exactly else 'NO'}")


def _verdict(difference: str | None, same: str) -> str:
    return same if difference is None else f"differ at {difference}: NO"


def step_ls(run: DemoRun) -> None:
    """List the resumed run, as `torchkeep ls` does."""
    print_line(f"$ torchkeep ls {run.run_dir}")
    with tk.CheckpointManager(run.run_dir, read_only=True) as mgr:
        render_run(mgr)


def step_plot(run: DemoRun) -> None:
    """Plot the run's metrics, as `torchkeep plot` does (needs matplotlib)."""
    if importlib.util.find_spec("matplotlib") is None:
        print_line("skipped: matplotlib is not installed (pip install 'torchkeep[plot]')")
        return
    print_line(f"$ torchkeep plot {run.run_dir} -o {run.plot_path}")
    with tk.CheckpointManager(run.run_dir, read_only=True) as mgr:
        path = write_plot(mgr, run.plot_path)
    print_line(f"wrote {path} ({human_bytes(path.stat().st_size)})")
