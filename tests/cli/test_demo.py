"""``torchkeep demo``: the whole workflow end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import torchkeep as tk
from torchkeep.cli import app
from torchkeep.cli._demo import CHECKPOINT_NAME, MODEL_DIR_NAME
from torchkeep.cli._demo_model import DemoMLP, make_data

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


@pytest.mark.usefixtures("terminal_env")
def test_demo_on_a_terminal_twice_in_one_workdir(runner: CliRunner, tmp_path: Path) -> None:
    with torch.random.fork_rng():  # the demo seeds the global RNG
        first = runner.invoke(app, ["demo", "--workdir", str(tmp_path), "--epochs", "1"])
        assert first.exit_code == 0, first.output
        assert BOX.search(first.stdout)  # rich tables and progress bar
        again = runner.invoke(app, ["demo", "--workdir", str(tmp_path), "--epochs", "1"])
        assert again.exit_code == 0, again.output  # the previous outputs are replaced
    assert "predictions identical: yes" in again.stdout


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
