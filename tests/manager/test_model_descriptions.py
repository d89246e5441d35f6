"""The manifest's ``models`` field: how to rebuild each model of the app (for ``load_model``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep as tk
from tests.models import (
    MLP,
    CapturedNet,
    MixinNet,
    MixinSub,
    Opaque,
    StarArgsNet,
    rewrite_manifest,
)
from torchkeep.format import RunReader, flatten


def manifest_doc(run: Path, step: int) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((run / "checkpoints" / f"{step:010d}.json").read_bytes())
    return doc


def described(model: nn.Module, class_path: str) -> dict[str, Any]:
    config = getattr(model, "_torchkeep_config")  # noqa: B009 - what the decorator captured
    return {"class": class_path, "config": flatten(config).skeleton}


def mixed_app() -> dict[str, Any]:
    model = CapturedNet(4, hidden=6, act="tanh")
    return {
        "model": model,
        "head": MixinSub(depth=3),
        "plain": MLP(),
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
        "epoch": 0,
    }


@pytest.mark.parametrize("async_save", [False, True])
def test_manifest_records_models_with_a_captured_config(tmp_path: Path, async_save: bool) -> None:
    run = tmp_path / "run"
    app = mixed_app()
    expected = {
        "model": described(app["model"], "tests.models:CapturedNet"),
        "head": described(app["head"], "tests.models:MixinSub"),
    }
    with tk.CheckpointManager(run, async_save=async_save) as mgr:
        mgr.save(0, app)
        if async_save:
            # Described at save() time, on the caller's thread: later changes to the app
            # do not reach the checkpoint being written.
            app["model"], app["head"] = MLP(), MLP()
            record = mgr.wait()
            assert record is not None and record.step == 0
    assert manifest_doc(run, 0)["models"] == expected  # "plain" has no captured config
    assert RunReader(run).manifest(0).models == expected


def test_modules_without_a_captured_config_are_not_described(tmp_path: Path) -> None:
    run = tmp_path / "run"
    app = {"model": MLP(), "seq": nn.Sequential(nn.Linear(2, 2)), "epoch": 1}
    with tk.CheckpointManager(run) as mgr:
        mgr.save(0, app)
    assert "models" not in manifest_doc(run, 0)  # written only when there is one
    assert RunReader(run).manifest(0).models == {}


def test_models_that_could_not_be_rebuilt_are_left_out_and_still_saved(tmp_path: Path) -> None:
    @tk.capture_config
    class Local(nn.Module):  # defined in a function: no import path
        def __init__(self, d: int = 2) -> None:
            super().__init__()
            self.fc = nn.Linear(d, d)

    run = tmp_path / "run"
    app = {
        "local": Local(),
        "star": StarArgsNet(3, 2),  # built with *args
        "opaque": MixinNet(d_in=2, d_out=2, thing=Opaque()),  # a config only pickle stores
        "tensor": MixinNet(d_in=2, d_out=2, scale=torch.ones(2)),  # a config holding a tensor
        "model": MixinNet(d_in=2, d_out=3),
    }
    with tk.CheckpointManager(run) as mgr:
        mgr.save(0, app)
        mgr.restore(app)
    assert list(manifest_doc(run, 0)["models"]) == ["model"]


def test_wrapped_models_are_described_by_the_model_they_wrap(tmp_path: Path) -> None:
    run = tmp_path / "run"
    inner = CapturedNet(4)
    compiled_inner = MixinNet(d_in=2, d_out=2)
    app = {"dp": nn.DataParallel(inner), "compiled": torch.compile(compiled_inner)}
    with tk.CheckpointManager(run) as mgr:
        mgr.save(0, app)
    assert manifest_doc(run, 0)["models"] == {
        "dp": described(inner, "tests.models:CapturedNet"),
        "compiled": described(compiled_inner, "tests.models:MixinNet"),
    }


def test_description_follows_the_model_in_each_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with tk.CheckpointManager(run) as mgr:
        mgr.save(0, {"model": CapturedNet(4, hidden=5)})
        mgr.save(1, {"model": CapturedNet(4, hidden=9)})
    configs = [RunReader(run).manifest(s).models["model"]["config"] for s in (0, 1)]
    assert configs[0] != configs[1]


@pytest.mark.parametrize(
    "models",
    [
        [],
        "tests.models:MLP",
        {"model": "tests.models:MLP"},
        {"model": {}},
        {"model": {"class": 3, "config": {"$": "dict", "v": {}}}},
        {"model": {"class": None}},
        {"model": ["tests.models:MLP"]},
    ],
)
def test_hostile_models_field_is_a_corrupt_checkpoint(tmp_path: Path, models: Any) -> None:
    run = tmp_path / "run"
    with tk.CheckpointManager(run) as mgr:
        mgr.save(0, {"model": CapturedNet(4)})
    rewrite_manifest(run / "checkpoints" / "0000000000.json", lambda d: d.update(models=models))
    with pytest.raises(tk.CorruptCheckpointError, match="invalid manifest"):
        RunReader(run).manifest(0)
    with pytest.raises(tk.CorruptCheckpointError):
        tk.load_model(f"{run}@0")


def test_models_field_is_sealed_by_the_manifest_digest(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with tk.CheckpointManager(run) as mgr:
        mgr.save(0, {"model": CapturedNet(4, hidden=5)})
    path = run / "checkpoints" / "0000000000.json"
    data = path.read_bytes()
    assert b'"hidden"' in data
    path.write_bytes(data.replace(b'"tests.models:CapturedNet"', b'"tests.models:MixinNet__"'))
    with pytest.raises(tk.CorruptCheckpointError, match="digest"):
        RunReader(run).manifest(0)
