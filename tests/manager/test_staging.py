"""Bounded and unbounded host staging of async saves, their arguments, the writer's priority.

See ``test_overlap`` for the overlapped snapshots themselves.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep as tk
from tests.manager.test_overlap import _assert_same, _parts, _snapshot, _train
from torchkeep.manager import _overlap


@pytest.fixture(autouse=True)
def _stage_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_overlap, "SYNC_BYTES", 0)


def test_staging_limit_stages_in_waves_within_the_limit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(128, 128) for _ in range(8)])  # 8 x 64 KiB weights
    opt = torch.optim.Adam(model.parameters())
    x = torch.randn(4, 128)
    _train(model, opt, x)
    app = {"model": model, "optimizer": opt}
    total = sum(t.numel() * 4 for t in _tensors(app))
    limit = 200 * 1024
    run = tmp_path / "run"
    with tk.CheckpointManager(run, async_save=True, overlap=True, staging_limit=limit) as mgr:
        expected = _snapshot(app)
        mgr.save(1, app)
        _train(model, opt, x)
        mgr.wait()
        stats = mgr.snapshot_stats
        assert stats is not None and stats.waves >= total // limit
        assert mgr._overlap.arena.capacity == limit  # the host memory staged into
    _assert_same(expected, {k: tk.load(f"{run}@1")[k] for k in app})
    assert len(list((run / "packs").iterdir())) == stats.waves
    # Without overlap, save() returns once everything is staged (the last wave not yet written).
    with tk.CheckpointManager(run, async_save=True, staging_limit=limit) as mgr:
        mgr.save(2, app)
        stats = mgr.snapshot_stats
        assert stats is not None and stats.staged_bytes + stats.sync_bytes == total
        mgr.wait()
    assert tk.verify(run).ok


def _tensors(app: dict[str, Any]) -> list[torch.Tensor]:
    model, opt = app["model"], app["optimizer"]
    out = list(model.state_dict().values())
    return out + [v for s in opt.state.values() for v in s.values()]


def test_unbounded_staging_holds_one_copy_of_the_state(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(128, 128) for _ in range(4)])
    opt = torch.optim.Adam(model.parameters())
    x = torch.randn(4, 128)
    _train(model, opt, x)
    app = {"model": model, "optimizer": opt}
    total = sum(t.numel() * t.element_size() for t in _tensors(app))
    with tk.CheckpointManager(tmp_path / "run", async_save=True, overlap=True) as mgr:
        for step in range(3):
            mgr.save(step, app)
            _train(model, opt, x)
        mgr.wait()
        assert total <= mgr._overlap.arena.capacity <= total * 1.1
    assert not mgr._overlap.arena.capacity  # released on close


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(tk.InvalidArgumentError, match="async_save=True"):
        tk.CheckpointManager(tmp_path / "a", overlap=True)
    with pytest.raises(tk.InvalidArgumentError, match="async_save=True"):
        tk.CheckpointManager(tmp_path / "b", staging_limit=2**20)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(tk.InvalidArgumentError, match="staging_limit must be a positive"):
            tk.CheckpointManager(tmp_path / "c", async_save=True, staging_limit=bad)  # type: ignore[arg-type]
    model, opt, _ = _parts()
    with tk.CheckpointManager(tmp_path / "d", async_save=True, staging_limit=256) as mgr:
        with pytest.raises(
            tk.InvalidArgumentError, match=r"tensor 'model\.\S+' \(512 bytes\)"
        ) as caught:
            mgr.save(1, {"model": model, "optimizer": opt})
        assert "at least 512" in (caught.value.hint or "")
        assert mgr.checkpoints == []


def test_the_writer_runs_at_a_lower_priority_than_the_loop(tmp_path: Path) -> None:
    model, opt, _ = _parts()
    with tk.CheckpointManager(tmp_path / "run", async_save=True, overlap=True) as mgr:
        mgr.save(1, {"model": model, "optimizer": opt})
        mgr.wait()
        writers = [t for t in threading.enumerate() if t.name.startswith("torchkeep-write")]
        assert len(writers) == 1 and writers[0].native_id is not None
        mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        assert os.getpriority(os.PRIO_PROCESS, writers[0].native_id) > mine  # nicer
