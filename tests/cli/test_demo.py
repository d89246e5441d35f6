"""``torchkeep demo``: the whole workflow end to end."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import torchkeep as tk
from torchkeep.cli import _demo_resume, app
from torchkeep.cli._demo_common import (
    CHECKPOINT_NAME,
    EXPORT_ONNX,
    EXPORT_PT2,
    MODEL_DIR_NAME,
    PLOT_NAME,
    RUN_DIR_NAME,
    STRAIGHT_DIR_NAME,
)
from torchkeep.cli._demo_model import DemoMLP, make_data
from torchkeep.cli._demo_resume import IDENTITY_LINE, TrainSpec, stop_epoch, train

from ._helpers import ANSI, BOX, run_torchkeep


@pytest.mark.slow
def test_demo_subprocess(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    proc = run_torchkeep("demo", "--workdir", str(workdir), "--epochs", "2", "--seed", "3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert out.rstrip().endswith("predictions identical: yes")
    assert "epoch 2/2" in out
    assert str(workdir.resolve()) in out
    assert not ANSI.search(out)
    assert not BOX.search(out)

    checkpoint = workdir / CHECKPOINT_NAME
    assert checkpoint.is_file()
    assert (workdir / MODEL_DIR_NAME).exists()
    info = tk.inspect(checkpoint)
    assert any(t.name.startswith("model_state_dict.") for t in info.tensors)
    assert info.metadata["hyperparameters"]["epochs"] == 2
    assert len(info.metadata["val_losses"]) == 2
    state = tk.load(checkpoint)
    assert state["epoch"] == 2
    assert set(state["optimizer_state_dict"]) == {"state", "param_groups"}

    # The checkpoint run: stopped after epoch 1 of 2 in one process, resumed in another.
    assert f"{IDENTITY_LINE}: yes" in out
    pids = re.findall(r"^new Python process \(pid (\d+)\):$", out, re.MULTILINE)
    assert len(pids) == 2 and len(set(pids)) == 2
    assert "  stopping after epoch 1 of 2, as a crash would" in out
    assert "  restored step 1 (model, Adam, StepLR, RNG, epoch=1)" in out
    assert re.search(r"^final weights \(state dict\) +13 tensors, torch.equal: yes$", out, re.M)
    run_dir = workdir / RUN_DIR_NAME
    with tk.CheckpointManager(run_dir, read_only=True) as mgr:
        assert [r.step for r in mgr.checkpoints] == [1, 2]
        assert [r["step"] for r in mgr.history] == [1, 2]
        assert mgr.policy.to_dict() == {
            "keep_last": 2,
            "keep_best": 1,
            "keep_every": None,
            "monitor": "val_loss",
            "mode": "min",
        }
    resumed = tk.load(f"{run_dir}@latest")
    straight = tk.load(f"{workdir / STRAIGHT_DIR_NAME}@latest")
    assert set(resumed) == {"model", "optimizer", "scheduler", "rng", "epoch"}
    assert resumed["epoch"] == 2
    for key, tensor in straight["model"].items():
        assert torch.equal(resumed["model"][key], tensor), key
    assert f"$ torchkeep ls {run_dir.resolve()}" in out
    assert re.search(r"^ +2 +latest,best +\d{4}-", out, re.MULTILINE)  # the ls table
    assert (workdir / PLOT_NAME).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    # It ends by exporting the run's best checkpoint, verified, and printing the report.
    exported = [workdir / EXPORT_ONNX, workdir / EXPORT_PT2]
    path = next(p for p in exported if p.is_file())
    assert f"$ torchkeep export {run_dir.resolve()}@best --example-shape 2,16 -o {path}" in out
    assert f"{path}: verified" in out and "max abs error" in out
    assert re.search(r"^cases +example \(batch 2\), batch 1, batch 3$", out, re.MULTILINE)
    assert tk.load_exported(path)(torch.randn(3, 16))[0].shape[-1] == 4
    # it ends by registering the best checkpoint and promoting it to production
    registry = tk.Registry(workdir / "models")
    production = registry.resolve("demo-mlp", "production")
    assert production.version == "1" and production.metrics["step"] == 2
    assert [m.to_version for m in registry.alias_history("demo-mlp", "production")] == ["1"]
    assert "demo-mlp@production: (new) -> 1" in out
    registry.close()


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch) -> list[TrainSpec]:
    """Run the demo's training "processes" in this process (each costs a torch import)."""
    specs: list[TrainSpec] = []

    def spawn(spec: TrainSpec) -> tuple[int, list[str]]:
        specs.append(spec)
        lines: list[str] = []
        train(spec, lines.append)
        return os.getpid(), lines

    monkeypatch.setattr(_demo_resume, "spawn", spawn)
    return specs


@pytest.mark.usefixtures("terminal_env", "in_process")
def test_demo_on_a_terminal_twice_in_one_workdir(runner: CliRunner, tmp_path: Path) -> None:
    with torch.random.fork_rng():  # the demo seeds the global RNG
        first = runner.invoke(app, ["demo", "--workdir", str(tmp_path), "--epochs", "1"])
        assert first.exit_code == 0, first.output
        assert BOX.search(first.stdout)  # rich tables and progress bar
        again = runner.invoke(app, ["demo", "--workdir", str(tmp_path), "--epochs", "1"])
        assert again.exit_code == 0, again.output  # the previous outputs are replaced
    assert "predictions identical: yes" in again.stdout


@pytest.mark.usefixtures("in_process")
def test_demo_fails_when_predictions_differ(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def untrained(path: object, *args: object, **kwargs: object) -> DemoMLP:
        return DemoMLP().eval()

    monkeypatch.setattr(tk, "load_model", untrained)
    with torch.random.fork_rng():
        result = runner.invoke(app, ["demo", "--workdir", str(tmp_path), "--epochs", "1"])
    assert result.exit_code == 1
    assert "predictions identical: no" in result.stdout
    assert result.stderr == "error: predictions differ after reloading with load_model\n"


def test_demo_fails_when_the_resume_differs(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def spawn(spec: TrainSpec) -> tuple[int, list[str]]:
        if spec.stop_after is None:  # the resumed process drops out more
            spec = dataclasses.replace(spec, hparams={**spec.hparams, "dropout": 0.3})
        lines: list[str] = []
        train(spec, lines.append)
        return os.getpid(), lines

    monkeypatch.setattr(_demo_resume, "spawn", spawn)
    with torch.random.fork_rng():
        result = runner.invoke(app, ["demo", "--workdir", str(tmp_path), "--epochs", "2"])
    assert result.exit_code == 1, result.output
    assert f"{IDENTITY_LINE}: NO" in result.stdout
    assert re.search(
        r"^final weights \(state dict\) +differ at net\.0\.weight: NO$", result.stdout, re.M
    )
    assert "predictions identical: yes" in result.stdout
    assert result.stderr == "error: the resumed run differs from the uninterrupted run\n"


def test_demo_refuses_to_delete_what_is_not_a_run(runner: CliRunner, tmp_path: Path) -> None:
    (tmp_path / RUN_DIR_NAME).mkdir()
    (tmp_path / RUN_DIR_NAME / "precious.txt").write_text("keep me")
    with torch.random.fork_rng():
        result = runner.invoke(app, ["demo", "--workdir", str(tmp_path), "--epochs", "1"])
    assert result.exit_code == 1
    assert "is not a torchkeep run: choose another --workdir" in result.stderr
    assert (tmp_path / RUN_DIR_NAME / "precious.txt").read_text() == "keep me"


def test_stop_epoch() -> None:
    assert [stop_epoch(n) for n in (2, 3, 4, 5, 10)] == [1, 2, 2, 3, 6]


def test_zero_epochs_is_a_usage_error(runner: CliRunner) -> None:
    result = runner.invoke(app, ["demo", "--epochs", "0"])
    assert result.exit_code == 2


def test_demo_model_rebuilds_from_its_config() -> None:
    model = DemoMLP(in_features=8, hidden=16, out_features=3, dropout=0.0)
    again = DemoMLP(**model.config)
    assert again.config == model.config
    assert [p.shape for p in again.parameters()] == [p.shape for p in model.parameters()]


def test_data_is_seeded() -> None:
    a, b, c = make_data(1), make_data(1), make_data(2)
    assert torch.equal(a.x_train, b.x_train)
    assert torch.equal(a.y_val, b.y_val)
    assert not torch.equal(a.x_train, c.x_train)
    assert a.num_classes == 4
