"""Training scripts for the exact-resume acceptance tests (run in fresh processes).

Each public ``train_*`` function has the signature ``assert_resumes_exactly`` expects:
``train(run_dir, stop_at) -> losses``. It builds everything from fixed seeds, restores the latest
checkpoint of ``run_dir`` when there is one, trains, and when ``stop_at`` is given returns right
after the checkpoint at step ``stop_at`` is committed. It returns the losses of this invocation.

The setup: a small MLP with BatchNorm and Dropout, a synthetic dataset of 256 samples, a shuffling
``DataLoader`` with its own ``torch.Generator`` (batch size 16, so 16 batches an epoch), Adam,
``StepLR(step_size=2, gamma=0.5)`` and ``tk.RNGState()``; 5 epochs.

Two checkpoint schedules:

* ``train_epochs``: one checkpoint at the end of every epoch; the step is the epoch index
  (0 to 4). ``stop_at=2`` stops after the third epoch; the resume trains epochs 3 and 4.
* ``train_mid_epoch``: the step is the global batch index (``epoch * 16 + batch``, 0 to 79); a
  checkpoint after every ``SAVE_EVERY`` batches and at the end of every epoch, written
  asynchronously. ``stop_at=39`` stops in the middle of epoch 2 (after its batch 7).

Resuming in the middle of an epoch (the pattern, also in ``torchkeep.state._app``): the shuffle
order of an epoch is drawn from the loader's generator when the epoch's iterator starts, so the
generator state saved mid-epoch (after that draw) cannot replay it. The app therefore keeps, as
plain values, ``epoch`` (the epoch of the next batch), ``batch`` (how many batches of that epoch
are done) and ``epoch_start`` (the loader generator's state when that epoch began). On resume,
when ``batch > 0``, the script sets the generator back to ``epoch_start``, starts the epoch's
iterator again (the same permutation is drawn) and skips the ``batch`` batches already trained.
At an epoch boundary (``batch == 0``) the restored generator is already where the next epoch
starts. Dropout and every other draw from torch's global generator are replayed by ``RNGState``.

The ``*_overlap`` variants save with ``async_save=True, overlap=True``, every tensor staged in the
background (``SYNC_BYTES = 0``), so that the hooks, not a copy in ``save()``, keep them exact.

The ``*_without_rng`` and ``*_without_scheduler`` variants forget one piece of state on purpose:
they must make ``assert_resumes_exactly`` fail.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchkeep as tk
from torchkeep.manager import _overlap

EPOCHS = 5
SAMPLES = 256
BATCH_SIZE = 16
BATCHES = SAMPLES // BATCH_SIZE  # per epoch
FEATURES = 12
CLASSES = 4
SAVE_EVERY = 5  # train_mid_epoch: a checkpoint after every 5 batches (steps 4, 9, 14...)
STOP_EPOCH = 2  # train_epochs: stop after epoch index 2 (three epochs done), resume 3 and 4
STOP_MID_EPOCH = 39  # train_mid_epoch: epoch 2, after its batch 7 (batches 32..39 of 0..79)


def _parts() -> tuple[nn.Module, torch.optim.Optimizer, Any, DataLoader[Any]]:
    torch.set_num_threads(1)
    # Every generator RNGState saves is seeded, even those this loop never draws from: an
    # unseeded one starts differently in every process, and the final checkpoints would differ.
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    data = torch.Generator().manual_seed(1234)
    x = torch.randn(SAMPLES, FEATURES, generator=data)
    y = torch.randint(0, CLASSES, (SAMPLES,), generator=data)
    loader = DataLoader(
        TensorDataset(x, y),
        batch_size=BATCH_SIZE,
        shuffle=True,
        generator=torch.Generator().manual_seed(99),
    )
    model = nn.Sequential(
        nn.Linear(FEATURES, 32),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(32, CLASSES),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return model, optimizer, scheduler, loader


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Any) -> float:
    x, y = batch
    loss = nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()  # type: ignore[no-untyped-call]
    optimizer.step()
    return float(loss.item())


def _overlapping(overlap: bool) -> dict[str, Any]:
    if not overlap:
        return {}
    _overlap.SYNC_BYTES = 0  # this process only: even BatchNorm's buffers are staged in the back
    return {"async_save": True, "overlap": True}


def _train_epochs(
    run_dir: str,
    stop_at: int | None,
    *,
    rng: bool = True,
    scheduler: bool = True,
    overlap: bool = False,
) -> list[float]:
    model, optimizer, sched, loader = _parts()
    app: dict[str, Any] = {"model": model, "optimizer": optimizer, "loader": loader, "epoch": -1}
    if scheduler:
        app["scheduler"] = sched
    if rng:
        app["rng"] = tk.RNGState()
    losses: list[float] = []
    with tk.CheckpointManager(run_dir, keep_last=2, **_overlapping(overlap)) as mgr:
        mgr.restore(app)  # None on a fresh run: app["epoch"] stays -1
        for epoch in range(app["epoch"] + 1, EPOCHS):
            model.train()
            for batch in loader:
                losses.append(_step(model, optimizer, batch))
            sched.step()
            app["epoch"] = epoch
            mgr.save(epoch, app, metrics={"loss": losses[-1]})
            if epoch == stop_at:
                break
    return losses


def train_epochs(run_dir: str, stop_at: int | None) -> list[float]:
    """A checkpoint at the end of every epoch; steps are epoch indices."""
    return _train_epochs(run_dir, stop_at)


def train_epochs_overlap(run_dir: str, stop_at: int | None) -> list[float]:
    """``train_epochs`` with overlapped async saves."""
    return _train_epochs(run_dir, stop_at, overlap=True)


def train_epochs_without_rng(run_dir: str, stop_at: int | None) -> list[float]:
    """Broken on purpose: no ``RNGState``, so dropout masks differ after a resume."""
    return _train_epochs(run_dir, stop_at, rng=False)


def train_epochs_without_scheduler(run_dir: str, stop_at: int | None) -> list[float]:
    """Broken on purpose: the scheduler restarts on resume, so the next LR decay comes late."""
    return _train_epochs(run_dir, stop_at, scheduler=False)


def train_mid_epoch(run_dir: str, stop_at: int | None, *, overlap: bool = False) -> list[float]:
    """Checkpoints every ``SAVE_EVERY`` batches and at epoch ends; steps are global batch indices."""
    model, optimizer, scheduler, loader = _parts()
    generator = loader.generator
    assert generator is not None
    app: dict[str, Any] = {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "rng": tk.RNGState(),
        "loader": loader,
        "epoch": 0,  # the epoch of the next batch
        "batch": 0,  # batches of that epoch already trained
        "epoch_start": generator.get_state(),  # the loader's generator when that epoch began
    }
    losses: list[float] = []
    args = _overlapping(overlap) or {"async_save": True}
    with tk.CheckpointManager(run_dir, keep_last=3, **args) as mgr:
        mgr.restore(app)
        for epoch in range(app["epoch"], EPOCHS):
            done = app["batch"]
            if done:  # resumed mid-epoch: replay this epoch's shuffle, skip what was trained
                generator.set_state(app["epoch_start"].clone())
            else:  # a new epoch: the generator is where this epoch's shuffle starts
                app["epoch_start"] = generator.get_state()
            model.train()
            for b, batch in enumerate(itertools.islice(loader, done, None), start=done):
                losses.append(_step(model, optimizer, batch))
                step = epoch * BATCHES + b
                last = b == BATCHES - 1
                if last:
                    scheduler.step()
                    app["epoch"], app["batch"] = epoch + 1, 0
                else:
                    app["epoch"], app["batch"] = epoch, b + 1
                if last or (step + 1) % SAVE_EVERY == 0:
                    mgr.save(step, app, metrics={"loss": losses[-1]})
                    if step == stop_at:
                        return losses  # leaving the with block commits the async save
    return losses


def train_mid_epoch_overlap(run_dir: str, stop_at: int | None) -> list[float]:
    """``train_mid_epoch`` with overlapped async saves."""
    return train_mid_epoch(run_dir, stop_at, overlap=True)
