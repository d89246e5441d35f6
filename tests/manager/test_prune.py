"""``CheckpointManager.prune``: a dry run returns the plan with its reasons and deletes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import torchkeep as tk


def _run(root: Path, losses: list[float]) -> None:
    with tk.CheckpointManager(root, monitor="val_loss") as mgr:  # no rule: everything kept
        for step, loss in enumerate(losses):
            mgr.save(step * 10, {"w": torch.full((4,), float(step))}, metrics={"val_loss": loss})


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_a_dry_run_returns_the_plan_with_reasons_and_deletes_nothing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _run(run, [5.0, 1.0, 4.0, 3.0, 6.0])  # steps 0, 10, 20, 30, 40; best is 10
    before = _files(run)
    with tk.CheckpointManager(run) as mgr:
        plan = mgr.prune(keep_last=2, keep_every=20, dry_run=True)
        assert isinstance(plan, tk.PrunePlan)
        assert plan.policy == tk.RetentionPolicy(keep_last=2, keep_every=20, monitor="val_loss")
        assert plan.keep == {
            0: ("keep_every",),
            10: ("best",),
            20: ("keep_every",),
            30: ("keep_last",),
            40: ("latest", "keep_every", "keep_last"),
        }
        assert plan.delete == []
        plan = mgr.prune(keep_last=1, dry_run=True)
        assert plan.keep == {10: ("best",), 40: ("latest", "keep_last")}
        assert plan.delete == [0, 20, 30]
        assert plan.to_dict() == {
            "policy": plan.policy.to_dict(),
            "keep": {"10": ["best"], "40": ["latest", "keep_last"]},
            "delete": [0, 20, 30],
        }
        assert [r.step for r in mgr.checkpoints] == [0, 10, 20, 30, 40]
        assert mgr.policy == tk.RetentionPolicy(monitor="val_loss")  # the stored policy stays
    assert _files(run).keys() == before.keys()  # nothing deleted
    # The plan is what a real prune then does.
    with tk.CheckpointManager(run) as mgr:
        assert mgr.prune(keep_last=1) == plan.delete
        assert [r.step for r in mgr.checkpoints] == [10, 40]


def test_a_dry_run_needs_no_writer_lock(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _run(run, [2.0, 1.0, 3.0])
    with tk.CheckpointManager(run) as writer:  # holds the run's lock
        reader = tk.CheckpointManager(run, read_only=True)
        assert reader.prune(keep_last=1, dry_run=True).delete == [0]
        with pytest.raises(tk.TorchkeepError, match="read-only"):
            reader.prune(keep_last=1)
        assert [r.step for r in writer.checkpoints] == [0, 10, 20]
