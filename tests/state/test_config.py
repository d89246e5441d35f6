"""save_model/load_model: rebuilding a model from its class path and constructor arguments."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from torch import nn

import torchkeep
from torchkeep import (
    CorruptCheckpointError,
    FormatVersionError,
    IncompatibleStateError,
    ModelClassError,
    UnsupportedValueError,
)
from torchkeep.format import MODEL_FILE, WEIGHTS_FILE
from torchkeep.state import captured_config, class_path, import_model_class

from ..models import (
    MLP,
    BNNet,
    CapturedNet,
    MixinNet,
    MixinNoInit,
    MixinSub,
    NotAModule,
    Opaque,
    StarArgsNet,
    TiedLM,
    fill_,
)


def same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    return torch.equal(a.eval()(x), b.eval()(x))


# --- capturing constructor arguments ----------------------------------------------------------


def test_capture_config_records_arguments_and_defaults() -> None:
    model = CapturedNet(3, act="tanh")
    assert captured_config(model) == {"d_in": 3, "hidden": 5, "act": "tanh", "widths": (2, 3)}
    assert captured_config(CapturedNet(d_in=2, hidden=9)) == {
        "d_in": 2,
        "hidden": 9,
        "act": "relu",
        "widths": (2, 3),
    }


def test_capture_config_keeps_the_class_usable() -> None:
    model = CapturedNet(3)
    assert CapturedNet.__init__.__name__ == "__init__"
    assert isinstance(model, nn.Module) and model.fc1.in_features == 3
    assert "_torchkeep_config" not in dict(model.named_buffers())
    assert set(model.state_dict()) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


def test_mixin_records_arguments_including_var_keywords() -> None:
    assert captured_config(MixinNet(4, extra_flag=True)) == {
        "d_in": 4,
        "d_out": 2,
        "extra_flag": True,
    }


def test_mixin_subclass_records_its_own_arguments() -> None:
    assert captured_config(MixinSub(depth=3)) == {"depth": 3, "d_in": 3}
    assert captured_config(MixinNoInit(d_in=5)) == {"d_in": 5, "d_out": 2}


def test_models_without_capture_have_no_config() -> None:
    assert captured_config(MLP()) is None


def test_star_args_cannot_be_replayed(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedValueError, match="config"):
        torchkeep.save_model(StarArgsNet(3, 4), tmp_path / "m")
    torchkeep.save_model(StarArgsNet(3, 4), tmp_path / "m", config={})  # explicit wins
    assert (tmp_path / "m" / MODEL_FILE).is_file()


# --- save_model / load_model ------------------------------------------------------------------


def test_save_model_with_explicit_config(tmp_path: Path) -> None:
    model = fill_(MLP(d_in=5, hidden=6, d_out=2), 1)
    torchkeep.save_model(model, tmp_path / "mlp", config={"d_in": 5, "hidden": 6, "d_out": 2})
    files = sorted(p.name for p in (tmp_path / "mlp").iterdir())
    assert files == sorted([MODEL_FILE, WEIGHTS_FILE])
    doc = json.loads((tmp_path / "mlp" / MODEL_FILE).read_text())
    assert doc["class"] == "tests.models:MLP"
    assert doc["format_version"] == "1.0"
    plain = safetensors.torch.load_file(str(tmp_path / "mlp" / WEIGHTS_FILE))
    assert set(plain) == set(model.state_dict())
    rebuilt = torchkeep.load_model(tmp_path / "mlp")
    assert type(rebuilt) is MLP and rebuilt.fc1.in_features == 5
    assert same_outputs(rebuilt, model, torch.randn(3, 5))


def test_save_model_with_capture_config(tmp_path: Path) -> None:
    model = fill_(CapturedNet(4, hidden=7, act="tanh", widths=(1, 4)), 2)
    torchkeep.save_model(model, tmp_path / "c")
    rebuilt = torchkeep.load_model(tmp_path / "c")
    assert type(rebuilt) is CapturedNet
    assert (rebuilt.act, rebuilt.widths) == ("tanh", (1, 4))
    assert same_outputs(rebuilt, model, torch.randn(2, 4))
    assert captured_config(rebuilt) == captured_config(model)


@pytest.mark.parametrize(
    "build",
    [lambda: MixinNet(d_in=6), lambda: MixinSub(depth=4, d_in=2), lambda: MixinNoInit(d_out=5)],
    ids=["mixin", "subclass", "subclass-no-init"],
)
def test_save_model_with_config_mixin(tmp_path: Path, build: Any) -> None:
    model = fill_(build(), 3)
    torchkeep.save_model(model, tmp_path / "m")
    rebuilt = torchkeep.load_model(tmp_path / "m")
    assert type(rebuilt) is type(model)
    x = torch.randn(2, model.fc.in_features)
    assert same_outputs(rebuilt, model, x)


def test_explicit_config_overrides_the_captured_one(tmp_path: Path) -> None:
    model = fill_(CapturedNet(3, hidden=4), 4)
    torchkeep.save_model(model, tmp_path / "m", config={"d_in": 3, "hidden": 4, "act": "tanh"})
    rebuilt = torchkeep.load_model(tmp_path / "m")
    assert rebuilt.act == "tanh" and rebuilt.widths == (2, 3)  # the class default, not captured
    torchkeep.save_model(model, tmp_path / "m", config={"d_in": 3, "hidden": 9})
    with pytest.raises(IncompatibleStateError):
        torchkeep.load_model(tmp_path / "m")  # weights of hidden=4 do not fit hidden=9


def test_load_model_is_in_eval_mode_with_identical_outputs(tmp_path: Path) -> None:
    model = fill_(BNNet(), 5).train()
    model(torch.randn(32, 4))
    torchkeep.save_model(model, tmp_path / "bn", config={"d": 4})
    rebuilt = torchkeep.load_model(tmp_path / "bn")
    assert not rebuilt.training
    assert all(not m.training for m in rebuilt.modules())
    x = torch.randn(6, 4)
    out = rebuilt(x)
    assert torch.equal(out, rebuilt(x))  # dropout off
    assert torch.equal(out, model.eval()(x))


def test_load_model_keeps_ties(tmp_path: Path) -> None:
    model = fill_(TiedLM(vocab=13, dim=5), 6)
    torchkeep.save_model(model, tmp_path / "lm", config={"vocab": 13, "dim": 5})
    rebuilt = torchkeep.load_model(tmp_path / "lm", map_location="cpu")
    assert rebuilt.out.weight is rebuilt.emb.weight
    ids = torch.tensor([0, 5, 12])
    assert same_outputs(rebuilt, model, ids)


def test_config_values_round_trip_with_their_types(tmp_path: Path) -> None:
    model = CapturedNet(2, hidden=3, act="relu", widths=(1, 1))
    torchkeep.save_model(model, tmp_path / "m")
    rebuilt = torchkeep.load_model(tmp_path / "m")
    assert type(rebuilt.widths) is tuple


def test_model_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedValueError) as info:
        torchkeep.save_model(MLP(), tmp_path / "m")
    assert "config" in (info.value.hint or "")
    assert not (tmp_path / "m" / MODEL_FILE).exists()


@pytest.mark.parametrize(
    "config",
    [{"d_in": torch.ones(1)}, {"d_in": Opaque()}, {"d_in": lambda: 1}],
    ids=["tensor", "object", "lambda"],
)
def test_config_must_be_plain_values(tmp_path: Path, config: dict[str, Any]) -> None:
    with pytest.raises(UnsupportedValueError):
        torchkeep.save_model(MLP(), tmp_path / "m", config=config)
    assert not (tmp_path / "m" / MODEL_FILE).exists()


def test_class_defined_inside_a_function_is_refused_at_save(tmp_path: Path) -> None:
    class Local(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(1, 1)

    with pytest.raises(ModelClassError) as info:
        torchkeep.save_model(Local(), tmp_path / "m", config={})
    assert "Local" in str(info.value)
    assert not (tmp_path / "m" / MODEL_FILE).exists()
    assert not (tmp_path / "m" / WEIGHTS_FILE).exists()


def test_class_path() -> None:
    assert class_path(MLP) == "tests.models:MLP"
    assert class_path(nn.Linear) == "torch.nn.modules.linear:Linear"


def _tamper(directory: Path, **changes: Any) -> None:
    """Rewrite the model description and seal it again, as anyone who can edit it can."""
    from torchkeep.format import seal_json

    doc = json.loads((directory / MODEL_FILE).read_text())
    doc.pop("digest", None)
    doc.update(changes)
    (directory / MODEL_FILE).write_bytes(seal_json(json.dumps(doc).encode()))


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    torchkeep.save_model(fill_(MLP(), 7), tmp_path / "m", config={})
    return tmp_path / "m"


@pytest.mark.parametrize(
    "cls",
    [
        "os:system",
        "subprocess:Popen",
        "builtins:eval",
        "tests.models:NotAModule",
        "tests.models:fill_",
        "torch:Tensor",
        "no_such_module_xyz:Net",
        "tests.models:NoSuchClass",
        "tests.models",
        ":MLP",
        "tests.models:",
    ],
)
def test_tampered_class_paths_are_refused(model_dir: Path, cls: str) -> None:
    _tamper(model_dir, **{"class": cls})
    NotAModule.constructed = False
    with pytest.raises(ModelClassError) as info:
        torchkeep.load_model(model_dir)
    assert isinstance(info.value, ImportError)
    assert cls.split(":")[0] in str(info.value) or cls in str(info.value)
    assert not NotAModule.constructed


def test_missing_module_names_it(model_dir: Path) -> None:
    _tamper(model_dir, **{"class": "no_such_module_xyz:Net"})
    with pytest.raises(ModelClassError) as info:
        torchkeep.load_model(model_dir)
    assert "no_such_module_xyz:Net" in str(info.value)
    assert info.value.hint


def test_import_model_class_accepts_modules_only() -> None:
    assert import_model_class("tests.models:MLP", source="x") is MLP
    with pytest.raises(ModelClassError):
        import_model_class("tests.models:Opaque", source="x")


def test_config_the_class_rejects(model_dir: Path) -> None:
    _tamper(model_dir, config={"$": "dict", "v": {"depth": 3}})
    with pytest.raises(ModelClassError, match="depth"):
        torchkeep.load_model(model_dir)


def test_config_that_changes_shapes(model_dir: Path) -> None:
    _tamper(model_dir, config={"$": "dict", "v": {"hidden": 16}})
    with pytest.raises(IncompatibleStateError):
        torchkeep.load_model(model_dir)


@pytest.mark.parametrize(
    "changes",
    [
        {"config": {"$": "list", "v": []}},
        {"config": {"$": "dict", "v": {"d_in": {"$": "tensor", "k": "fc1.weight"}}}},
        {"config": {"$": "nonsense"}},
        {"class": 5},
        {"format_version": None},
    ],
    ids=json.dumps,
)
def test_corrupt_model_descriptions(model_dir: Path, changes: dict[str, Any]) -> None:
    _tamper(model_dir, **changes)
    with pytest.raises(CorruptCheckpointError):
        torchkeep.load_model(model_dir)


def test_model_description_not_json(model_dir: Path) -> None:
    (model_dir / MODEL_FILE).write_text("{not json")
    with pytest.raises(CorruptCheckpointError):
        torchkeep.load_model(model_dir)


def test_newer_model_format_is_refused(model_dir: Path) -> None:
    _tamper(model_dir, format_version="99.0")
    with pytest.raises(FormatVersionError):
        torchkeep.load_model(model_dir)


def test_model_dir_missing_its_weights(model_dir: Path) -> None:
    (model_dir / WEIGHTS_FILE).unlink()
    with pytest.raises(torchkeep.CheckpointNotFoundError):
        torchkeep.load_model(model_dir)


def test_load_model_on_a_weights_file_says_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    torchkeep.save(MLP().state_dict(), path)
    with pytest.raises(ModelClassError) as info:
        torchkeep.load_model(path)
    assert "load_into" in (info.value.hint or "")


def test_save_model_overwrites_atomically(tmp_path: Path) -> None:
    a, b = fill_(MLP(), 1), fill_(MLP(), 2)
    torchkeep.save_model(a, tmp_path / "m", config={})
    torchkeep.save_model(b, tmp_path / "m", config={})
    rebuilt = torchkeep.load_model(tmp_path / "m")
    assert same_outputs(rebuilt, b, torch.randn(2, 4))
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == sorted([MODEL_FILE, WEIGHTS_FILE])
