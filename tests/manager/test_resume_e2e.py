"""Acceptance: a run stopped at a checkpoint and resumed in a new process is bit-identical.

Real processes (see ``resume_scripts``): an MLP with BatchNorm and Dropout, a shuffling
DataLoader with its own generator, Adam, StepLR and ``tk.RNGState()``, 5 epochs. Every logged
loss and the final checkpoint (weights, BatchNorm buffers, optimizer moments, scheduler, RNG and
loader generator states) must equal an uninterrupted run's bit for bit; forgetting a piece of
state must be caught.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import torchkeep as tk
from tests.manager import resume_scripts as rs
from torchkeep.testing import assert_resumes_exactly

# Overlapped async saves (every tensor copied in the background, guarded by the hooks) must
# resume as exactly as synchronous ones.
OVERLAP = pytest.param(True, marks=pytest.mark.slow, id="overlap")


@pytest.mark.parametrize("overlap", [pytest.param(False, id="plain"), OVERLAP])
def test_stopped_after_an_epoch_and_resumed_is_bit_identical(tmp_path: Path, overlap: bool) -> None:
    train = rs.train_epochs_overlap if overlap else rs.train_epochs
    report = assert_resumes_exactly(train, stop_at=rs.STOP_EPOCH, workdir=tmp_path)

    assert report.steps_compared == rs.EPOCHS * rs.BATCHES
    assert report.resumed_losses == (48, 32)  # epochs 0-2, then epochs 3-4 in a new process
    assert report.final_step == rs.EPOCHS - 1
    # What was compared: the final checkpoint holds all the state that a resume depends on.
    state = tk.load(f"{report.resumed_dir}@latest")
    assert set(state) == {"model", "optimizer", "scheduler", "rng", "loader", "epoch"}
    assert {"1.running_mean", "1.running_var", "1.num_batches_tracked"} <= set(state["model"])
    assert len(state["optimizer"]["state"]) == 6  # exp_avg, exp_avg_sq, step of 6 params
    assert state["scheduler"]["last_epoch"] == rs.EPOCHS
    assert state["optimizer"]["param_groups"][0]["lr"] == 1e-2 * 0.5**2
    # Every leaf of it was compared: tensors (and NumPy arrays) and plain values.
    assert (report.tensors_compared, report.values_compared) == _leaves(state)


@pytest.mark.parametrize("overlap", [pytest.param(False, id="async"), OVERLAP])
def test_stopped_mid_epoch_and_resumed_is_bit_identical(tmp_path: Path, overlap: bool) -> None:
    # Two interruptions, both inside an epoch: after batch 3 of epoch 1, after batch 7 of epoch 2.
    stops = [19, rs.STOP_MID_EPOCH]
    train = rs.train_mid_epoch_overlap if overlap else rs.train_mid_epoch
    report = assert_resumes_exactly(train, stop_at=stops, workdir=tmp_path)

    assert report.steps_compared == rs.EPOCHS * rs.BATCHES
    assert report.resumed_losses == (20, 20, 40)
    assert report.final_step == rs.EPOCHS * rs.BATCHES - 1
    state = tk.load(f"{report.resumed_dir}@latest")
    assert (state["epoch"], state["batch"]) == (rs.EPOCHS, 0)
    # The resumed run's checkpoints are the straight run's: same steps, same metrics.
    with (
        tk.CheckpointManager(report.straight_dir, read_only=True) as a,
        tk.CheckpointManager(report.resumed_dir, read_only=True) as b,
    ):
        assert [c.step for c in a.checkpoints] == [c.step for c in b.checkpoints] == [69, 74, 79]
        assert [r["metrics"] for r in a.history] == [r["metrics"] for r in b.history]


def test_a_resume_without_rng_state_is_caught(tmp_path: Path) -> None:
    with pytest.raises(AssertionError) as caught:
        assert_resumes_exactly(rs.train_epochs_without_rng, stop_at=rs.STOP_EPOCH, workdir=tmp_path)
    message = str(caught.value)
    # Dropout draws other masks from the first batch after the resume: loss 48.
    assert "losses first differ at index 48 (resumed invocation 2 of 2, its loss 0)" in message
    assert re.search(r"straight run 0x[0-9a-f.]+p[-+]\d+ \(\d\.\d+\), resumed run 0x", message)
    assert "the final checkpoints first differ at model.0.weight: float32 (32, 12):" in message
    assert "max abs diff" in message and "first at index (" in message
    assert str(tmp_path / "straight") in message


def test_a_resume_without_the_scheduler_is_caught(tmp_path: Path) -> None:
    with pytest.raises(AssertionError) as caught:
        assert_resumes_exactly(
            rs.train_epochs_without_scheduler, stop_at=rs.STOP_EPOCH, workdir=tmp_path
        )
    message = str(caught.value)
    # The optimizer's LR is restored, so epoch 3 is still right; the restarted StepLR then
    # misses the decay after epoch 3, and epoch 4 trains with twice the LR: loss 64 is computed
    # before its first update, loss 65 is the first to differ.
    assert "losses first differ at index 65 (resumed invocation 2 of 2, its loss 17)" in message
    assert "the final checkpoints first differ at model.0.weight" in message


def _leaves(state: object) -> tuple[int, int]:
    """(tensors and arrays, plain values) in a loaded state."""
    if isinstance(state, torch.Tensor | np.ndarray):
        return 1, 0
    if isinstance(state, dict | list | tuple):
        children = [_leaves(v) for v in (state.values() if isinstance(state, dict) else state)]
        return sum(c[0] for c in children), sum(c[1] for c in children)
    return 0, 1
