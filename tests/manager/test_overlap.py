"""Overlapped async saves: ``save()`` returns before the copy, hooks guard what changes, versions
prove each snapshot exact, ``staging_limit`` stages in waves.

The save thread is held at its copies by a gate (``held``) so that the order of events is fixed:
these tests do not depend on timing. Every tensor is staged in the background here
(``SYNC_BYTES = 0``), unless a test says otherwise.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep as tk
from torchkeep.manager import _overlap
from torchkeep.manager._staging import DeviceCopies


@pytest.fixture(autouse=True)
def _stage_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_overlap, "SYNC_BYTES", 0)


class Gate:
    """Holds the save thread before its copies of the tensors in ``hold`` (all when empty)."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.hold: list[torch.Tensor] = []
        self.after_copy: Callable[[torch.Tensor], None] | None = None

    def held(self, src: torch.Tensor) -> bool:
        if threading.current_thread() is threading.main_thread():
            return False  # the copies save() makes itself
        ptr = src.untyped_storage().data_ptr()
        return not self.hold or any(t.untyped_storage().data_ptr() == ptr for t in self.hold)


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    g = Gate()
    original = DeviceCopies.copy

    def copy(self: DeviceCopies, dst: torch.Tensor, src: torch.Tensor) -> None:
        if g.held(src):
            assert g.opened.wait(20), "the test never opened the gate"
        original(self, dst, src)
        if g.after_copy is not None and threading.current_thread() is not threading.main_thread():
            g.after_copy(src)

    monkeypatch.setattr(DeviceCopies, "copy", copy)
    yield g
    g.opened.set()


class EMANet(nn.Module):
    """Linear + BatchNorm + Linear, with an average of the first weight kept as a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 2))
        self.register_buffer("ema", torch.zeros(16, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # type: ignore[no-any-return]


def _parts() -> tuple[EMANet, torch.optim.Optimizer, torch.Tensor]:
    torch.manual_seed(0)
    model = EMANet()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    x = torch.randn(32, 8)
    _train(model, opt, x)  # the optimizer has its state
    return model, opt, x


def _train(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


def _snapshot(app: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint of ``app`` must hold, cloned now."""
    out: dict[str, Any] = {}
    for key, value in app.items():
        state = value.state_dict() if hasattr(value, "state_dict") else value
        out[key] = _clone(state)
    return out


def _clone(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, dict):
        return {k: _clone(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return type(v)(_clone(x) for x in v)
    return v


def _assert_same(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert {str(k) for k in a} == {str(k) for k in b}, where
        by_name = {str(k): x for k, x in b.items()}
        for k, x in a.items():
            _assert_same(x, by_name[str(k)], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _in_thread(fn: Callable[[], None]) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def test_save_returns_before_the_copy_and_the_checkpoint_is_the_state_at_save(
    tmp_path: Path, gate: Gate
) -> None:
    model, opt, x = _parts()
    app = {"model": model, "optimizer": opt}
    expected = _snapshot(app)
    with tk.CheckpointManager(tmp_path / "run", async_save=True, overlap=True) as mgr:
        assert mgr.save(1, app) is None
        stats = mgr.snapshot_stats
        assert stats is not None and stats.staged_bytes == 0  # nothing copied yet
        # The next step waits in the hooks until what it changes is copied.
        step = _in_thread(lambda: _train(model, opt, x))
        step.join(0.3)
        assert step.is_alive()
        gate.opened.set()
        step.join(10)
        assert not step.is_alive()
        record = mgr.wait()
        assert record is not None and record.step == 1
        assert stats.hook_seconds > 0.2 and stats.waves == 1
    _assert_same(expected, {k: tk.load(f"{tmp_path / 'run'}@1")[k] for k in app})
    assert not torch.equal(model.body[0].weight, expected["model"]["body.0.weight"])


def test_hooks_wait_only_for_the_tensors_about_to_change(tmp_path: Path, gate: Gate) -> None:
    model, opt, x = _parts()
    app = {"model": model, "optimizer": opt}
    expected = _snapshot(app)
    gate.hold = [p for p in model.parameters()]  # the buffers are copied, the parameters held
    with tk.CheckpointManager(tmp_path / "run", async_save=True, overlap=True) as mgr:
        mgr.save(1, app)
        # BatchNorm's forward changes its running statistics without bumping their versions:
        # only its forward pre-hook keeps them exact, and it needs only the buffers.
        with torch.no_grad():
            model(x)
        assert not torch.equal(model.body[1].running_mean, expected["model"]["body.1.running_mean"])
        step = _in_thread(lambda: opt.step())  # changes the parameters: waits for them
        step.join(0.3)
        assert step.is_alive()
        gate.opened.set()
        step.join(10)
        mgr.wait()
    _assert_same(expected, {k: tk.load(f"{tmp_path / 'run'}@1")[k] for k in app})


def test_a_manual_in_place_update_fails_the_save_loudly(tmp_path: Path, gate: Gate) -> None:
    model, opt, x = _parts()
    app = {"model": model, "optimizer": opt}
    run = tmp_path / "run"
    with tk.CheckpointManager(run, async_save=True, overlap=True) as mgr:
        gate.opened.set()
        mgr.save(1, app)
        mgr.wait()
        packs = sorted(p.name for p in (run / "packs").iterdir())
        gate.opened.clear()
        mgr.save(2, app)
        with torch.no_grad():
            model.body[0].weight.add_(1.0)  # no hook guards this
        gate.opened.set()
        with pytest.raises(tk.SnapshotChangedError) as caught:
            mgr.wait()
        err = caught.value
        assert err.key == "body.0.weight" or err.key == "model.body.0.weight"
        assert "changed in place after save(2) was called, before it was copied" in err.message
        assert "step 2 was not saved" in err.message and "wait_staged()" in (err.hint or "")
        assert [c.step for c in mgr.checkpoints] == [1]  # nothing committed
        assert sorted(p.name for p in (run / "packs").iterdir()) == packs  # its pack deleted
        # The manager goes on: the next save is exact.
        expected = _snapshot(app)
        mgr.save(3, app)
        _train(model, opt, x)
        mgr.wait()
    _assert_same(expected, {k: tk.load(f"{run}@3")[k] for k in app})


def test_a_change_during_the_copy_is_caught(tmp_path: Path, gate: Gate) -> None:
    model, opt, _ = _parts()
    weight = model.body[2].weight
    gate.opened.set()

    def racing_writer(src: torch.Tensor) -> None:  # lands while the copy is "in flight"
        if src.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr():
            with torch.no_grad():
                weight.mul_(2.0)

    gate.after_copy = racing_writer
    with tk.CheckpointManager(tmp_path / "run", async_save=True, overlap=True) as mgr:
        mgr.save(1, {"model": model, "optimizer": opt})
        with pytest.raises(tk.SnapshotChangedError, match="body.2.weight") as caught:
            mgr.wait()
        assert "while it was copied" in caught.value.message
        assert mgr.checkpoints == []


def test_an_ema_model_is_copied_in_save_so_its_update_never_races(
    tmp_path: Path, gate: Gate
) -> None:
    model, opt, x = _parts()
    ema = EMANet()
    ema.load_state_dict(model.state_dict())
    app = {"model": model, "optimizer": opt, "ema": ema}
    expected = _snapshot(app)
    with tk.CheckpointManager(tmp_path / "run", async_save=True, overlap=True) as mgr:
        mgr.save(1, app)
        stats = mgr.snapshot_stats
        assert stats is not None and stats.sync_bytes >= sum(
            p.numel() * 4 for p in ema.parameters()
        )
        step = _in_thread(lambda: _train(model, opt, x))
        gate.opened.set()
        step.join(10)
        with torch.no_grad():  # an EMA update right after the step: no hook guards it
            for e, p in zip(ema.parameters(), model.parameters(), strict=True):
                e.lerp_(p, 0.5)
        mgr.wait()
    _assert_same(expected, {k: tk.load(f"{tmp_path / 'run'}@1")[k] for k in app})


def test_an_ema_kept_in_a_guarded_module_is_caught(tmp_path: Path, gate: Gate) -> None:
    model, opt, x = _parts()
    with tk.CheckpointManager(tmp_path / "run", async_save=True, overlap=True) as mgr:
        mgr.save(1, {"model": model, "optimizer": opt})
        with torch.no_grad():  # outside forward: the module's hook does not see it
            model.ema.lerp_(model.body[0].weight, 0.1)
        gate.opened.set()
        with pytest.raises(tk.SnapshotChangedError, match="'model.ema'"):
            mgr.wait()
        assert mgr.checkpoints == []


def test_after_wait_staged_in_place_changes_are_safe(tmp_path: Path, gate: Gate) -> None:
    model, opt, x = _parts()
    app = {"model": model, "optimizer": opt}
    expected = _snapshot(app)
    with tk.CheckpointManager(tmp_path / "run", async_save=True, overlap=True) as mgr:
        mgr.save(1, app)
        waiter = _in_thread(mgr.wait_staged)
        waiter.join(0.2)
        assert waiter.is_alive()
        gate.opened.set()
        waiter.join(10)
        with torch.no_grad():
            model.ema.lerp_(model.body[0].weight, 0.1)
            model.body[0].weight.add_(1.0)
        mgr.wait()
    _assert_same(expected, {k: tk.load(f"{tmp_path / 'run'}@1")[k] for k in app})


def test_non_tensor_state_is_captured_at_save(tmp_path: Path, gate: Gate) -> None:
    model, opt, x = _parts()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    loader = torch.utils.data.DataLoader(
        list(range(8)), batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(3)
    )
    app = {"model": model, "optimizer": opt, "scheduler": sched, "rng": tk.RNGState()}
    app |= {"loader": loader, "epoch": 4}
    expected = _snapshot({k: v for k, v in app.items() if k not in ("rng", "loader")})
    rng = tk.RNGState().state_dict()
    loader_state = loader.generator.get_state()  # type: ignore[union-attr]
    with tk.CheckpointManager(tmp_path / "run", async_save=True, overlap=True) as mgr:
        mgr.save(1, app)
        step = _in_thread(lambda: _train(model, opt, x))
        gate.opened.set()
        step.join(10)
        sched.step()
        app["epoch"] = 5
        torch.rand(3)
        list(loader)
        mgr.wait()
    saved = tk.load(f"{tmp_path / 'run'}@1")
    _assert_same(expected, {k: saved[k] for k in expected})
    assert saved["optimizer"]["state"][0]["step"] == 1  # Adam's count before the next step
    assert torch.equal(saved["rng"]["torch"], rng["torch"])
    assert torch.equal(saved["loader"]["generator"], loader_state)


def test_small_tensors_are_copied_in_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_overlap, "SYNC_BYTES", 64 * 1024)
    model, opt, _ = _parts()
    big = nn.Linear(256, 256)
    app = {"model": model, "optimizer": opt, "big": big, "opt2": torch.optim.SGD(big.parameters())}
    with tk.CheckpointManager(tmp_path / "run", async_save=True, overlap=True) as mgr:
        mgr.save(1, app)
        mgr.wait()
        stats = mgr.snapshot_stats
        assert stats is not None
        assert stats.staged_bytes == 256 * 256 * 4  # only the big weight went to the thread
        assert stats.sync_bytes > 0


def test_close_removes_the_hooks(tmp_path: Path) -> None:
    model, opt, x = _parts()
    with tk.CheckpointManager(tmp_path / "run", async_save=True, overlap=True) as mgr:
        mgr.save(1, {"model": model, "optimizer": opt})
        assert opt._optimizer_step_pre_hooks and model.body[1]._forward_pre_hooks
    assert not opt._optimizer_step_pre_hooks and not model.body[1]._forward_pre_hooks
    start = time.perf_counter()
    _train(model, opt, x)  # no hook left to wait in
    assert time.perf_counter() - start < 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_state_is_staged_in_pinned_memory(tmp_path: Path) -> None:  # pragma: no cover
    model = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64)).cuda()
    opt = torch.optim.Adam(model.parameters())
    x = torch.randn(8, 64, device="cuda")
    _train(model, opt, x)
    app = {"model": model, "optimizer": opt}
    expected = _snapshot(app)
    with tk.CheckpointManager(tmp_path / "run", async_save=True, overlap=True) as mgr:
        mgr.save(1, app)
        for _ in range(3):
            _train(model, opt, x)
        mgr.wait()
        block = mgr._overlap.arena._block
        assert block is not None and block.is_pinned()
    saved = tk.load(f"{tmp_path / 'run'}@1", map_location="cuda")
    _assert_same(expected, {k: saved[k] for k in app})


def test_overlap_and_staging_limit_are_refused_in_a_distributed_job() -> None:
    # Rank 0's commit merges the other ranks' parts into a flat state, never into a snapshot.
    for kwargs in (
        {"overlap": True, "staging_limit": None},
        {"overlap": False, "staging_limit": 8},
    ):
        with pytest.raises(tk.InvalidArgumentError, match="not supported in a torch.distributed"):
            _overlap.Overlap(async_save=True, distributed=True, **kwargs)  # type: ignore[arg-type]
    assert not _overlap.Overlap(None, async_save=True, overlap=False, distributed=True).active
