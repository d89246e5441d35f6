"""``torchkeep diff`` and ``torchkeep convert`` driven as a user would."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

import torchkeep as tk
from torchkeep.cli import app


def test_diff_lists_changes_and_exits_1(tmp_path: Path) -> None:
    tk.save({"w": torch.ones(2), "gone": torch.zeros(1)}, tmp_path / "a.pt")
    tk.save({"w": torch.ones(2) * 3, "new": torch.zeros(1)}, tmp_path / "b.safetensors")
    result = CliRunner().invoke(
        app, ["diff", str(tmp_path / "a.pt"), str(tmp_path / "b.safetensors")]
    )
    assert result.exit_code == 1
    assert "new" in result.stdout and "gone" in result.stdout and "changed" in result.stdout
    assert "1 added, 1 removed, 1 changed" in result.stdout
    result = CliRunner().invoke(
        app, ["diff", "--json", str(tmp_path / "a.pt"), str(tmp_path / "a.pt")]
    )
    assert result.exit_code == 0
    assert json.loads(result.stdout)["identical"] == ["w", "gone"]


def test_convert_with_key_options(tmp_path: Path) -> None:
    tk.save(
        {"state_dict": {"module.w": torch.ones(2), "module.b": torch.ones(1)}}, tmp_path / "x.ckpt"
    )
    out = tmp_path / "y.safetensors"
    result = CliRunner().invoke(
        app,
        [
            "convert",
            str(tmp_path / "x.ckpt"),
            str(out),
            "--strip-prefix",
            "module.",
            "--rename",
            "^w$=weight",
            "--dtype",
            "bf16",
            "--only",
            "module.w",
        ],
    )
    assert result.exit_code == 0, result.stdout
    loaded = tk.load(out)
    assert list(loaded) == ["weight"] and loaded["weight"].dtype == torch.bfloat16


def test_convert_usage_errors(tmp_path: Path) -> None:
    tk.save({"w": torch.ones(2)}, tmp_path / "a.pt")
    result = CliRunner().invoke(
        app, ["convert", str(tmp_path / "a.pt"), str(tmp_path / "b.safetensors"), "--dtype", "int9"]
    )
    assert result.exit_code == 2 and "unknown --dtype" in result.stderr
    result = CliRunner().invoke(
        app,
        ["convert", str(tmp_path / "a.pt"), str(tmp_path / "b.safetensors"), "--rename", "nope"],
    )
    assert result.exit_code == 2 and "PATTERN=REPLACEMENT" in result.stderr
    result = CliRunner().invoke(
        app, ["convert", str(tmp_path / "missing.pt"), str(tmp_path / "b.safetensors")]
    )
    assert result.exit_code == 1 and result.stderr.startswith("CheckpointNotFoundError")
