"""``torchkeep inspect`` on real files: torchkeep, plain safetensors and torch.save checkpoints."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

import torchkeep as tk
from torchkeep.cli import app
from torchkeep.cli._inspect import TERMINAL_LIMIT
from torchkeep.cli._output import format_shape

from ._helpers import ANSI, BOX, assert_clean_error, run_torchkeep

METADATA = {"run": "exp1", "lr": 0.001, "optimizer": {"name": "adam", "betas": [0.9, 0.999]}}


class TiedLM(nn.Module):
    """A tiny language-model head whose output projection is the embedding (tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A nested tutorial-style checkpoint with tied weights and metadata, saved with tk.save."""
    path = tmp_path / "ckpt.safetensors"
    state = {
        "epoch": 3,
        "model_state_dict": TiedLM().state_dict(),
        "step": torch.tensor(7),
        "history": [0.5, 0.25],
    }
    tk.save(state, path, metadata=METADATA)
    return path


def _lines_with(out: str, *parts: str) -> list[str]:
    return [line for line in out.splitlines() if all(p in line for p in parts)]


def test_plain_output_lists_tensors_shared_and_metadata(
    runner: CliRunner, checkpoint: Path
) -> None:
    info = tk.inspect(checkpoint)
    assert info.shared, "tied weights should be reported as shared"
    result = runner.invoke(app, ["inspect", str(checkpoint)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert info.format in out
    for t in info.tensors:
        assert _lines_with(out, t.name, t.dtype, format_shape(t.shape)), t.name
    assert "model_state_dict.embed.weight" in out
    for name, other in info.shared.items():
        assert _lines_with(out, name, other)
    assert _lines_with(out, "run", "exp1")
    assert _lines_with(out, "optimizer", '{"name":"adam","betas":[0.9,0.999]}')
    assert re.search(rf"^parameters +{info.num_params:,}$", out, re.MULTILINE)
    assert not ANSI.search(out)
    assert not BOX.search(out)
    assert result.stderr == ""


def test_json_is_to_dict_and_nothing_else(runner: CliRunner, checkpoint: Path) -> None:
    result = runner.invoke(app, ["inspect", "--json", str(checkpoint)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data == json.loads(json.dumps(tk.inspect(checkpoint).to_dict()))
    assert data["metadata"]["optimizer"] == METADATA["optimizer"]
    assert data["shared"]


@pytest.mark.usefixtures("terminal_env")
def test_terminal_output_is_a_rich_table(runner: CliRunner, checkpoint: Path) -> None:
    result = runner.invoke(app, ["inspect", str(checkpoint)])
    assert result.exit_code == 0, result.output
    assert BOX.search(result.stdout)
    assert "model_state_dict.embed.weight" in result.stdout


@pytest.fixture
def many_tensors(tmp_path: Path) -> Path:
    path = tmp_path / "many.safetensors"
    save_file(
        {f"layer{i:03d}.weight": torch.zeros(2) for i in range(TERMINAL_LIMIT + 5)}, str(path)
    )
    return path


def test_limit(runner: CliRunner, many_tensors: Path) -> None:
    piped = runner.invoke(app, ["inspect", str(many_tensors)])
    assert piped.exit_code == 0, piped.output
    assert f"layer{TERMINAL_LIMIT + 4:03d}.weight" in piped.stdout  # piped: every row
    assert "more tensors" not in piped.stdout

    limited = runner.invoke(app, ["inspect", "--limit", "3", str(many_tensors)])
    assert "layer002.weight" in limited.stdout
    assert "layer003.weight" not in limited.stdout
    assert f"... {TERMINAL_LIMIT + 2} more tensors" in limited.stdout


@pytest.mark.usefixtures("terminal_env")
def test_terminal_default_limit(runner: CliRunner, many_tensors: Path) -> None:
    result = runner.invoke(app, ["inspect", str(many_tensors)])
    assert result.exit_code == 0, result.output
    assert "... 5 more tensors" in result.stdout
    everything = runner.invoke(app, ["inspect", "-n", "0", str(many_tensors)])
    assert "more tensors" not in everything.stdout


def test_plain_safetensors_file(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file(
        {"w": torch.ones(3, 2, dtype=torch.float16), "b": torch.zeros(3)},
        str(path),
        metadata={"format": "pt"},
    )
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert _lines_with(result.stdout, "w", "float16", "(3, 2)")
    assert _lines_with(result.stdout, "b", "float32", "(3)")


def test_torch_save_file(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save({"fc.weight": torch.randn(5, 4), "fc.bias": torch.zeros(5)}, path)
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert tk.inspect(path).format in result.stdout
    assert _lines_with(result.stdout, "fc.weight", "float32", "(5, 4)")
    assert _lines_with(result.stdout, "fc.bias", "float32", "(5)")


def test_inspect_never_loads_tensors(
    runner: CliRunner, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("inspect must not load the checkpoint")

    monkeypatch.setattr(tk, "load", refuse)
    result = runner.invoke(app, ["inspect", str(checkpoint)])
    assert result.exit_code == 0, result.output


def test_missing_file(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["inspect", str(tmp_path / "nope.safetensors")])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert_clean_error(result.stderr, "CheckpointNotFoundError")
    assert "nope.safetensors" in result.stderr


def test_empty_directory(runner: CliRunner, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["inspect", str(empty)])
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert_clean_error(result.stderr)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("garbage.safetensors", b"\x00\x01 this is not a checkpoint" * 10),
        ("garbage.pt", b"PK\x03\x04 truncated zip"),
        ("notes.txt", b"hello"),
    ],
)
def test_garbage_file(runner: CliRunner, tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert_clean_error(result.stderr)


def test_missing_argument_is_a_usage_error(runner: CliRunner) -> None:
    assert runner.invoke(app, ["inspect"]).exit_code == 2


# --- through the installed command, with real pipes --------------------------------------------


def test_piped_subprocess(checkpoint: Path) -> None:
    proc = run_torchkeep("inspect", str(checkpoint))
    assert proc.returncode == 0, proc.stderr
    assert "model_state_dict.embed.weight" in proc.stdout
    assert not ANSI.search(proc.stdout)
    assert not BOX.search(proc.stdout)

    as_json = run_torchkeep("inspect", "--json", str(checkpoint))
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["num_tensors"] == len(tk.inspect(checkpoint).tensors)


def test_error_subprocess(tmp_path: Path) -> None:
    proc = run_torchkeep("inspect", str(tmp_path / "missing.pt"))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert_clean_error(proc.stderr, "CheckpointNotFoundError")


def _trained() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Linear(3, 2)  # 8 parameters
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(1, 3)).sum().backward()
    opt.step()  # exp_avg, exp_avg_sq and step for each parameter
    return model, opt


def test_inspect_shows_plain_values_and_counts_model_parameters_only(
    runner: CliRunner, tmp_path: Path
) -> None:
    model, opt = _trained()
    run = tmp_path / "run"
    with tk.CheckpointManager(run) as mgr:
        app_state = {"model": model, "optimizer": opt, "rng": tk.RNGState()}
        mgr.save(1, {**app_state, "epoch": 3, "loss": 0.25})
    # A Lightning-style file: hyperparameters one level down, optimizer states in a list.
    lightning = tmp_path / "last.ckpt"
    torch.save(
        {
            "epoch": 7,
            "global_step": 700,
            "state_dict": model.state_dict(),
            "optimizer_states": [opt.state_dict()],
            "hyper_parameters": {"lr": 0.001, "layers": [3, 2], "name": "mlp"},
            "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 7}}}},
        },
        lightning,
    )
    expected = {
        f"{run}@latest": {"epoch": 3, "loss": 0.25},
        str(lightning): {
            "epoch": 7,
            "global_step": 700,
            "hyper_parameters.lr": 0.001,
            "hyper_parameters.layers": [3, 2],
            "hyper_parameters.name": "mlp",
        },
    }
    for ref, values in expected.items():
        info = tk.inspect(ref)
        assert info.num_params == 8, ref  # not exp_avg/exp_avg_sq/step, not the RNG bytes
        assert info.values == values, ref
        assert any(t.optimizer_state and t.name.endswith("exp_avg") for t in info.tensors)
        out = runner.invoke(app, ["inspect", ref]).stdout
        assert re.search(r"^parameters +8$", out, re.MULTILINE), out
        for key, value in values.items():
            assert re.search(rf"^{re.escape(key)} +{re.escape(str(value))}", out, re.M) or (
                _lines_with(out, key, json.dumps(value, separators=(",", ":")))
            ), (ref, key)
        data = json.loads(runner.invoke(app, ["inspect", "--json", ref]).stdout)
        assert data["values"] == values and data["num_params"] == 8
