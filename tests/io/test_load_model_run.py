"""``load_model`` on a run's checkpoint: ``RUN@best``, ``RUN@latest``, ``RUN@<step>``, ``RUN``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep as tk
from tests.models import MLP, CapturedNet, MixinSub, NotAModule, fill_, rewrite_manifest

X = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))


def outputs(model: nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def make_run(run: Path, app: dict[str, Any], steps: int = 1, **kwargs: Any) -> None:
    with tk.CheckpointManager(run, **kwargs) as mgr:
        for step in range(steps):
            for seed, value in enumerate(app.values()):
                if isinstance(value, nn.Module):
                    fill_(value, 100 * step + seed)
            mgr.save(step, app, metrics={"val_loss": float(abs(step - 1))})


def test_load_model_rebuilds_the_best_checkpoints_model(tmp_path: Path) -> None:
    run = tmp_path / "run"
    model = CapturedNet(4, hidden=7, act="tanh", widths=(1, 2))
    expected: dict[int, torch.Tensor] = {}
    with tk.CheckpointManager(run, monitor="val_loss", async_save=True) as mgr:
        for step, loss in enumerate([3.0, 1.0, 2.0]):
            fill_(model, step)
            expected[step] = outputs(model)
            model.train()
            mgr.save(step, {"model": model, "epoch": step}, metrics={"val_loss": loss})
    for ref, step in [("@best", 1), ("@latest", 2), ("@0", 0), ("", 2)]:
        rebuilt = tk.load_model(f"{run}{ref}")
        assert type(rebuilt) is CapturedNet and not rebuilt.training
        assert rebuilt.act == "tanh" and rebuilt.widths == (1, 2)
        assert torch.equal(outputs(rebuilt), expected[step]), ref
    rebuilt = tk.load_model(run / "", map_location="cpu")  # a PathLike run directory
    assert all(p.device.type == "cpu" for p in rebuilt.parameters())


def test_load_model_rebuilds_a_config_mixin_model(tmp_path: Path) -> None:
    run = tmp_path / "run"
    model = MixinSub(depth=3, d_in=4)
    make_run(run, {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)})
    rebuilt = tk.load_model(f"{run}@latest", map_location=torch.device("cpu"))
    assert type(rebuilt) is MixinSub and rebuilt.depth == 3
    assert torch.equal(outputs(rebuilt), outputs(model))


def test_several_models_model_is_the_default_and_key_picks_another(tmp_path: Path) -> None:
    run = tmp_path / "run"
    app = {"model": CapturedNet(4, hidden=3), "ema": CapturedNet(4, hidden=9), "plain": MLP()}
    make_run(run, app)
    default = tk.load_model(f"{run}@latest")
    assert default.fc1.out_features == 3
    assert torch.equal(outputs(default), outputs(app["model"]))
    ema = tk.load_model(f"{run}@latest", key="ema")
    assert ema.fc1.out_features == 9
    assert torch.equal(outputs(ema), outputs(app["ema"]))


def test_same_architecture_under_two_keys_loads_the_chosen_entrys_weights(tmp_path: Path) -> None:
    run = tmp_path / "run"
    app = {"student": CapturedNet(4), "teacher": CapturedNet(4)}
    make_run(run, app)
    for key in app:
        rebuilt = tk.load_model(str(run), key=key)
        assert torch.equal(outputs(rebuilt), outputs(app[key])), key
    assert not torch.equal(outputs(app["student"]), outputs(app["teacher"]))


def test_several_models_without_model_key_is_ambiguous(tmp_path: Path) -> None:
    run = tmp_path / "run"
    make_run(run, {"student": CapturedNet(4), "teacher": CapturedNet(4, hidden=8)})
    with pytest.raises(tk.ModelClassError) as info:
        tk.load_model(f"{run}@latest")
    text = str(info.value)
    assert "'student'" in text and "'teacher'" in text and "key=" in text
    with pytest.raises(tk.ModelClassError, match="no model under 'ema'") as info:
        tk.load_model(f"{run}@latest", key="ema")
    assert "'student'" in str(info.value)


def test_a_checkpoint_without_a_described_model_says_how_to_fix_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    make_run(run, {"model": MLP(), "epoch": 3}, steps=2, monitor="val_loss")
    ref = f"{run}@best"
    with pytest.raises(tk.ModelClassError, match="records no model") as info:
        tk.load_model(ref)
    assert info.value.path == ref
    assert "@torchkeep.capture_config" in (info.value.hint or "")
    assert "ConfigMixin" in (info.value.hint or "")
    assert "torchkeep.load_into(model," in (info.value.hint or "")
    model = MLP()  # the way out the hint gives works
    tk.load_into(model, ref)


def test_a_constructor_that_rejects_the_config_is_a_model_class_error(tmp_path: Path) -> None:
    run = tmp_path / "run"
    make_run(run, {"model": CapturedNet(4)})

    def add_argument(doc: dict[str, Any]) -> None:
        doc["models"]["model"]["config"]["v"]["removed_since"] = 1

    rewrite_manifest(run / "checkpoints" / "0000000000.json", add_argument)
    with pytest.raises(tk.ModelClassError, match="rejected the saved config"):
        tk.load_model(f"{run}@0")


def test_weights_are_loaded_strictly(tmp_path: Path) -> None:
    run = tmp_path / "run"
    make_run(run, {"model": CapturedNet(4, hidden=5)})

    def widen(doc: dict[str, Any]) -> None:
        doc["models"]["model"]["config"]["v"]["hidden"] = 6

    rewrite_manifest(run / "checkpoints" / "0000000000.json", widen)
    with pytest.raises(tk.IncompatibleStateError):
        tk.load_model(f"{run}@0")


@pytest.mark.parametrize("cls", ["tests.models:NotAModule", "os:system", "no_such_pkg_x:Net"])
def test_a_hostile_class_is_never_called(tmp_path: Path, cls: str) -> None:
    run = tmp_path / "run"
    make_run(run, {"model": CapturedNet(4)})
    rewrite_manifest(
        run / "checkpoints" / "0000000000.json",
        lambda d: d["models"]["model"].update({"class": cls}),
    )
    with pytest.raises(tk.ModelClassError):
        tk.load_model(f"{run}@0")
    assert not NotAModule.constructed


def test_a_config_that_refers_to_tensors_is_corrupt(tmp_path: Path) -> None:
    run = tmp_path / "run"
    make_run(run, {"model": CapturedNet(4)})

    def tensor_config(doc: dict[str, Any]) -> None:
        doc["models"]["model"]["config"] = {"$": "tensor", "key": "model.fc1.weight"}

    rewrite_manifest(run / "checkpoints" / "0000000000.json", tensor_config)
    with pytest.raises(tk.CorruptCheckpointError):
        tk.load_model(f"{run}@0")


def test_a_description_without_its_entry_is_corrupt(tmp_path: Path) -> None:
    run = tmp_path / "run"
    make_run(run, {"model": CapturedNet(4)})
    rewrite_manifest(
        run / "checkpoints" / "0000000000.json",
        lambda d: d["models"].update(ghost=d["models"]["model"]),
    )
    with pytest.raises(tk.CorruptCheckpointError, match="'ghost'"):
        tk.load_model(f"{run}@0", key="ghost")


def test_wrapped_models_are_rebuilt_unwrapped(tmp_path: Path) -> None:
    run = tmp_path / "run"
    inner = CapturedNet(4, hidden=6)
    make_run(run, {"dp": nn.DataParallel(inner), "compiled": torch.compile(CapturedNet(4))})
    rebuilt = tk.load_model(f"{run}@latest", key="dp")
    assert type(rebuilt) is CapturedNet
    assert torch.equal(outputs(rebuilt), outputs(inner))
    assert type(tk.load_model(f"{run}@latest", key="compiled")) is CapturedNet


def test_inspect_of_a_run_checkpoint_names_its_models(tmp_path: Path) -> None:
    run = tmp_path / "run"
    make_run(run, {"model": CapturedNet(4), "plain": MLP()})
    assert tk.inspect(f"{run}@latest").metadata["models"] == {"model": "tests.models:CapturedNet"}
