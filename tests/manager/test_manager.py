"""CheckpointManager in one process: commit protocol, retention, dedup, lock, references."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep as tk
from torchkeep.manager import RunLockedError


def make_app(seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    return {"model": model, "optimizer": opt, "epoch": 0}


def train_step(app: dict[str, Any]) -> float:
    x = torch.randn(16, 4)
    loss = app["model"](x).pow(2).mean()
    app["optimizer"].zero_grad()
    loss.backward()
    app["optimizer"].step()
    return float(loss.detach())


def files(run: Path, sub: str) -> list[str]:
    return sorted(p.name for p in (run / sub).iterdir())


def test_save_then_restore_into_fresh_app_is_exact(tmp_path: Path) -> None:
    app = make_app()
    with tk.CheckpointManager(tmp_path / "run") as mgr:
        for step in range(3):
            train_step(app)
            app["epoch"] = step
            record = mgr.save(step, app, metrics={"loss": torch.tensor(0.5 - step / 10)})
            assert record is not None and record.step == step
    fresh = make_app(seed=1)
    with tk.CheckpointManager(tmp_path / "run") as mgr:
        info = mgr.restore(fresh)
    assert info is not None and info.step == 2 and info.values["epoch"] == 2 == info["epoch"]
    assert fresh["epoch"] == 2
    assert info.metrics == {"loss": pytest.approx(0.3)}
    for a, b in zip(
        app["model"].state_dict().values(), fresh["model"].state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    sa, sb = app["optimizer"].state_dict(), fresh["optimizer"].state_dict()
    for k in sa["state"]:
        assert torch.equal(sa["state"][k]["exp_avg_sq"], sb["state"][k]["exp_avg_sq"])


def test_restore_on_empty_run_returns_none(tmp_path: Path) -> None:
    with tk.CheckpointManager(tmp_path / "run") as mgr:
        assert mgr.restore(make_app()) is None
        assert mgr.latest is None and mgr.best is None and mgr.checkpoints == []


def test_retention_keeps_exactly_the_expected_and_leaves_no_orphans(tmp_path: Path) -> None:
    run = tmp_path / "run"
    app = make_app()
    losses = [5.0, 1.0, 4.0, 3.0, 6.0]
    with tk.CheckpointManager(run, keep_last=2, keep_best=1, monitor="val_loss") as mgr:
        for step, loss in enumerate(losses):
            train_step(app)
            mgr.save(step, app, metrics={"val_loss": loss})
        assert [c.step for c in mgr.checkpoints] == [1, 3, 4]
        assert mgr.best is not None and mgr.best.step == 1
        assert mgr.latest is not None and mgr.latest.step == 4
    assert files(run, "checkpoints") == ["0000000001.json", "0000000003.json", "0000000004.json"]
    used = set()
    for name in files(run, "checkpoints"):
        doc = json.loads((run / "checkpoints" / name).read_text())
        used |= {t["pack"] for t in doc["tensors"].values()}
    assert set(files(run, "packs")) == used
    assert not [p for p in run.rglob("*") if ".tkp-" in p.name]
    # the metrics history keeps every step, deleted checkpoints included
    history = tk.CheckpointManager(run, read_only=True).history
    assert [h["step"] for h in history] == [0, 1, 2, 3, 4]


def test_identical_tensors_are_not_written_again(tmp_path: Path) -> None:
    run = tmp_path / "run"
    backbone = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))  # 2 x 256 KiB weights
    head = nn.Linear(256, 4)
    app = {"backbone": backbone, "head": head}
    with tk.CheckpointManager(run) as mgr:
        mgr.save(0, app)
        mgr.save(1, app)  # nothing changed: the large tensors are referenced, not rewritten
        packs = files(run, "packs")
        assert (run / "packs" / packs[1]).stat().st_size < 16 * 1024
        for p in head.parameters():  # fine-tune only the head
            p.data.add_(1.0)
        mgr.save(2, app)
    third = max((run / "packs").iterdir(), key=lambda p: p.name)
    head_bytes = sum(p.numel() * 4 for p in head.parameters())
    backbone_bytes = sum(p.numel() * 4 for p in backbone.parameters())
    assert third.stat().st_size < head_bytes + 16 * 1024 < backbone_bytes
    state = tk.load(f"{run}@2")
    assert torch.equal(state["backbone"]["0.weight"], backbone[0].weight)
    assert torch.equal(state["head"]["weight"], head.weight)


def test_crash_before_commit_leaves_no_checkpoint_and_is_swept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    app = make_app()
    with tk.CheckpointManager(run) as mgr:
        mgr.save(0, app)
    import torchkeep.storage._local as storage_module  # where LocalStorage.write_atomic commits

    real = storage_module.atomic_write

    def failing(path: Any, write: Any) -> None:
        if Path(path).parent.name == "checkpoints":
            raise OSError(28, "No space left on device")
        real(path, write)

    real_create = storage_module.create_exclusive

    def failing_create(path: Any, write: Any) -> bool:  # a new step's manifest: the commit
        if Path(path).parent.name == "checkpoints":
            raise OSError(28, "No space left on device")
        return real_create(path, write)

    train_step(app)
    mgr = tk.CheckpointManager(run)
    monkeypatch.setattr(storage_module, "atomic_write", failing)
    monkeypatch.setattr(storage_module, "create_exclusive", failing_create)
    with pytest.raises(OSError):
        mgr.save(1, app)
    mgr.close()
    monkeypatch.setattr(storage_module, "atomic_write", real)
    monkeypatch.setattr(storage_module, "create_exclusive", real_create)
    # simulate a pack orphaned by a kill between the pack's rename and the manifest's (a real
    # pack: the sweep deletes only files whose header says they are torchkeep packs)
    (run / "packs" / "0000000009-deadbeef.safetensors").write_bytes(
        (run / "packs" / files(run, "packs")[0]).read_bytes()
    )
    with tk.CheckpointManager(run) as mgr:
        assert [c.step for c in mgr.checkpoints] == [0]
    assert len(files(run, "packs")) == 1
    assert tk.load(f"{run}@latest")["epoch"] == 0


def test_second_writer_is_refused_readers_are_not(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with tk.CheckpointManager(run) as mgr:
        mgr.save(0, make_app())
        with pytest.raises(RunLockedError, match=str(os.getpid())):
            tk.CheckpointManager(run)
        reader = tk.CheckpointManager(run, read_only=True)
        assert [c.step for c in reader.checkpoints] == [0]
        assert tk.load(f"{run}@0")["epoch"] == 0
        with pytest.raises(tk.TorchkeepError, match="read-only"):
            reader.save(1, make_app())
    tk.CheckpointManager(run).close()  # released on close


def test_bad_arguments_are_invalid_argument_errors(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(tk.InvalidArgumentError, match="keep_last must be a positive integer"):
        tk.CheckpointManager(run, keep_last=0)
    with pytest.raises(ValueError, match="keep_last"):  # also the builtin a caller would catch
        tk.CheckpointManager(run, keep_last=0)
    with tk.CheckpointManager(run) as mgr:
        for step in (-1, 1.5, True, "3"):
            with pytest.raises(tk.InvalidArgumentError, match="non-negative integer"):
                mgr.save(step, make_app())  # type: ignore[arg-type]  # bad on purpose
        assert mgr.checkpoints == []


def test_policy_is_remembered(tmp_path: Path) -> None:
    run = tmp_path / "run"
    tk.CheckpointManager(run, keep_last=1, monitor="acc", mode="max").close()
    with tk.CheckpointManager(run) as mgr:
        assert (
            mgr.policy.keep_last == 1 and mgr.policy.monitor == "acc" and mgr.policy.mode == "max"
        )
        app = make_app()
        for step, acc in enumerate([0.2, 0.9, 0.1]):
            mgr.save(step, app, metrics={"acc": acc})
        assert [c.step for c in mgr.checkpoints] == [1, 2]


def test_references_work_in_load_load_into_and_inspect(tmp_path: Path) -> None:
    run = tmp_path / "run"
    app = make_app()
    with tk.CheckpointManager(run, monitor="val_loss") as mgr:
        for step, loss in enumerate([3.0, 1.0, 2.0]):
            train_step(app)
            app["epoch"] = step
            mgr.save(step, app, metrics={"val_loss": loss})
    assert tk.load(f"{run}@best")["epoch"] == 1
    assert tk.load(f"{run}@latest")["epoch"] == 2
    assert tk.load(f"{run}@0")["epoch"] == 0
    assert tk.load(str(run))["epoch"] == 2
    fresh = make_app(seed=3)["model"]
    report = tk.load_into(fresh, f"{run}@latest")
    assert report.entry == "model" and report.ok
    for a, b in zip(app["model"].state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    info = tk.inspect(f"{run}@best")
    assert info.format == "torchkeep-run" and info.metadata["step"] == 1
    with pytest.raises(tk.CheckpointNotFoundError, match="step 7"):
        tk.load(f"{run}@7")


def test_restore_into_another_architecture_names_the_differences(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with tk.CheckpointManager(run) as mgr:
        mgr.save(0, make_app())
        other = make_app()
        other["model"] = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
        before = [p.clone() for p in other["model"].parameters()]
        with pytest.raises(tk.IncompatibleStateError) as err:
            mgr.restore(other)
        assert "0.weight" in str(err.value)
        assert all(
            torch.equal(a, b) for a, b in zip(before, other["model"].parameters(), strict=True)
        )


def test_run_written_by_newer_format_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with tk.CheckpointManager(run) as mgr:
        mgr.save(0, make_app())
    doc = json.loads((run / "torchkeep_run.json").read_text())
    doc["format_version"] = "2.0"
    (run / "torchkeep_run.json").write_text(json.dumps(doc))
    with pytest.raises(tk.FormatVersionError, match="upgrade"):
        tk.CheckpointManager(run)
    with pytest.raises(tk.FormatVersionError):
        tk.load(f"{run}@latest")


def test_async_save_commits_in_background_and_surfaces_errors(tmp_path: Path) -> None:
    run = tmp_path / "run"
    app = make_app()
    with tk.CheckpointManager(run, async_save=True) as mgr:
        assert mgr.save(0, app, metrics={"loss": 1.0}) is None
        weights = {k: v.clone() for k, v in app["model"].state_dict().items()}
        train_step(app)  # changes the weights while the write may still run
        record = mgr.wait()
        assert record is not None and record.step == 0
    saved = tk.load(f"{run}@0")["model"]
    assert all(torch.equal(saved[k], v) for k, v in weights.items())

    class Broken:
        def state_dict(self) -> dict[str, Any]:
            return {"x": object()}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            pass

    with tk.CheckpointManager(run, async_save=True) as mgr, pytest.raises(tk.UnsupportedValueError):
        mgr.save(1, {"broken": Broken()})
        mgr.wait()


def test_equal_tensors_stored_once_come_back_as_distinct_memory(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with tk.CheckpointManager(run) as mgr:
        mgr.save(0, {"a": torch.zeros(4), "b": torch.zeros(4), "steps": [torch.tensor(3.0)] * 1})
    state = tk.load(f"{run}@0")
    state["a"].add_(1.0)  # an in-place update (as Adam does to its step) must not leak
    assert torch.equal(state["b"], torch.zeros(4))
    assert state["a"].data_ptr() != state["b"].data_ptr()


def test_async_staging_buffers_are_allocated_once(tmp_path: Path) -> None:
    app = make_app()
    train_step(app)  # so that the optimizer has its state from the first save on
    with tk.CheckpointManager(tmp_path / "run", async_save=True) as mgr:
        mgr.save(0, app)
        first = {k: v.data_ptr() for k, v in mgr._stager.buffers.items()}
        train_step(app)
        mgr.save(1, app)
        assert {k: v.data_ptr() for k, v in mgr._stager.buffers.items()} == first
        app["model"][3] = nn.Linear(8, 5)  # a new shape gets a new buffer, the rest are reused
        mgr.save(2, app)
        mgr.wait()
    assert tk.load(f"{tmp_path / 'run'}@2")["model"]["3.weight"].shape == (5, 8)
    assert torch.equal(
        tk.load(f"{tmp_path / 'run'}@1")["model"]["0.weight"], app["model"][0].weight
    )


def test_async_writer_error_surfaces_at_the_next_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchkeep.storage._local as storage_module  # where LocalStorage.write_atomic commits

    def disk_full(path: Any, write: Any) -> None:
        raise tk.StorageError("could not write the file: No space left on device", path=str(path))

    app = make_app()
    mgr = tk.CheckpointManager(tmp_path / "run", async_save=True)
    mgr.save(0, app)
    mgr.wait()
    monkeypatch.setattr(storage_module, "atomic_write", disk_full)
    assert mgr.save(1, app) is None  # returns at once; the failure happens in the writer
    with pytest.raises(tk.StorageError, match="No space left"):
        mgr.save(2, app)  # the next call raises the writer's error
    monkeypatch.undo()
    mgr.save(3, app)
    mgr.close()
    assert [c.step for c in tk.CheckpointManager(tmp_path / "run", read_only=True).checkpoints] == [
        0,
        3,
    ]


def test_process_exiting_with_a_pending_async_save_finishes_it(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = (
        "import torch, torchkeep as tk\n"
        "m = torch.nn.Linear(512, 512)\n"
        f"mgr = tk.CheckpointManager({str(tmp_path / 'run')!r}, async_save=True)\n"
        "mgr.save(7, {'model': m})\n"
        "# no wait(), no close(): the interpreter exits with the write pending\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    state = tk.load(f"{tmp_path / 'run'}@latest")
    assert state["model"]["weight"].shape == (512, 512)


def test_a_flipped_byte_in_a_pack_is_detected_on_load_and_restore(tmp_path: Path) -> None:
    run = tmp_path / "run"
    app = make_app()
    with tk.CheckpointManager(run) as mgr:
        mgr.save(0, app)
    pack = next((run / "packs").iterdir())
    data = bytearray(pack.read_bytes())
    data[-3] ^= 0x01  # inside the last tensor's bytes: the header stays valid
    pack.write_bytes(bytes(data))
    with pytest.raises(tk.CorruptCheckpointError, match="does not match its hash"):
        tk.load(f"{run}@0")
    with pytest.raises(tk.CorruptCheckpointError, match="does not match its hash"):
        tk.load_into(make_app()["model"], f"{run}@0")
    with tk.CheckpointManager(run) as mgr, pytest.raises(tk.CorruptCheckpointError):
        mgr.restore(make_app())
    assert tk.load(f"{run}@0", verify=False)["epoch"] == 0  # the explicit opt-out still reads


def test_reopening_with_another_policy_warns_names_both_and_records_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    tk.CheckpointManager(run, keep_last=3, monitor="val_loss").close()
    with pytest.warns(UserWarning, match="retention policy changes") as caught:
        tk.CheckpointManager(run, keep_last=1).close()
    text = str(caught[0].message)
    assert "keep_last=3" in text and "keep_last=1" in text and str(run) in text
    with pytest.warns(UserWarning, match="retention policy changes"):
        tk.CheckpointManager(run, keep_every=10, mode="max").close()
    doc = json.loads((run / "torchkeep_run.json").read_text())
    assert doc["policy"]["keep_every"] == 10 and doc["policy"]["keep_last"] == 1
    history = doc["policy_history"]
    assert [(h["from"]["keep_last"], h["to"]["keep_last"]) for h in history] == [(3, 1), (1, 1)]
    assert history[1]["from"]["mode"] == "min" and history[1]["to"]["mode"] == "max"
    assert all(isinstance(h["time"], float) for h in history)
    # The same policy, given again or left out, is no change: no warning, no new entry.
    tk.CheckpointManager(run).close()
    tk.CheckpointManager(run, keep_last=1, monitor="val_loss").close()
    tk.CheckpointManager(run, read_only=True, keep_last=7).close()  # a view, not a change
    assert json.loads((run / "torchkeep_run.json").read_text())["policy_history"] == history


def test_an_unknown_selector_is_named_with_the_valid_ones(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with tk.CheckpointManager(run) as mgr:
        for step in (5, 10):
            mgr.save(step, {"epoch": step})
    for read in (tk.load, tk.inspect, tk.verify):
        with pytest.raises(tk.CheckpointNotFoundError) as caught:
            read(f"{run}@bset")
        err = caught.value
        assert err.message.startswith("unknown selector 'bset'"), read
        assert "RUN@latest, RUN@best or RUN@<step>" in (err.hint or "")
        assert "5, 10" in (err.hint or "")
    # A file whose name has an "@" beside a directory that is no run stays a file path.
    (tmp_path / "plain").mkdir()
    with pytest.raises(tk.CheckpointNotFoundError, match="no such file"):
        tk.load(tmp_path / "plain@bset")
