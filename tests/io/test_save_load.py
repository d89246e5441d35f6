"""torchkeep.save and torchkeep.load: round trips, paths, refusals, memory mapping."""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep
from torchkeep import CheckpointNotFoundError, StorageError, UnsupportedValueError

from ..helpers import (
    MIB,
    SUFFIXES,
    assert_helpful,
    roundtrip,
    run_py,
    temporaries,
    tutorial_checkpoint,
)
from ..models import MLP, BNNet, Opaque, assert_same, fill_


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_state_dict_round_trip(tmp_path: Path, suffix: str) -> None:
    sd = fill_(BNNet(), 1).state_dict()
    out = roundtrip(sd, tmp_path / f"m{suffix}")
    assert_same(sd, out)
    assert isinstance(out, OrderedDict)
    # the per-module versions load_state_dict uses to upgrade old BatchNorm checkpoints
    assert getattr(out, "_metadata", None) == sd._metadata


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_tutorial_checkpoint_round_trip_resumes_training_exactly(
    tmp_path: Path, suffix: str
) -> None:
    ckpt, model, opt = tutorial_checkpoint()
    out = roundtrip(ckpt, tmp_path / f"ckpt{suffix}")
    assert_same(ckpt, out)
    assert out["optimizer_state_dict"]["state"].keys() == {0, 1, 2, 3}  # int keys kept

    model2 = BNNet()
    model2.load_state_dict(out["model_state_dict"])
    opt2 = torch.optim.Adam(model2.parameters())
    opt2.load_state_dict(out["optimizer_state_dict"])
    assert opt2.param_groups[0]["betas"] == (0.9, 0.99)
    x = torch.randn(8, 4)
    for m, o in ((model, opt), (model2, opt2)):
        torch.manual_seed(1)
        o.zero_grad()
        m(x).pow(2).mean().backward()
        o.step()
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)


def test_str_paths_and_uppercase_suffixes(tmp_path: Path) -> None:
    path = str(tmp_path / "Ünïcode dir" / "CKPT.PT")
    torchkeep.save({"w": torch.ones(2)}, path)
    assert Path(path).read_bytes()[:4] == b"PK\x03\x04"
    assert torch.equal(torchkeep.load(path)["w"], torch.ones(2))
    assert torchkeep.inspect(path).format == "torch-zip"


def test_saving_onto_a_directory_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(StorageError):
        torchkeep.save({"w": torch.ones(1)}, tmp_path / "d.safetensors")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.safetensors"
    for call in (torchkeep.load, torchkeep.inspect, torchkeep.load_model):
        with pytest.raises(CheckpointNotFoundError) as info:
            call(path)
        assert isinstance(info.value, FileNotFoundError)
        assert_helpful(info.value, path)
    with pytest.raises(CheckpointNotFoundError):
        torchkeep.load_into(nn.Linear(1, 1), path)


def test_directory_without_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointNotFoundError) as info:
        torchkeep.load(tmp_path)
    assert_helpful(info.value, tmp_path)


def test_directory_holding_model_safetensors_loads(tmp_path: Path) -> None:
    sd = fill_(MLP(), 3).state_dict()
    torchkeep.save(sd, tmp_path / "model.safetensors")
    assert_same(sd, torchkeep.load(tmp_path))


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize(
    ("value", "what"),
    [
        (Opaque(), "Opaque"),
        (lambda x: x, "function"),
        (torch.randn(3, 3).to_sparse(), "sparse"),
        (object(), "object"),
        (nn.Linear(1, 1), "Linear"),
    ],
    ids=["object", "lambda", "sparse", "bare-object", "module"],
)
def test_unsupported_values_name_where_they_are(
    tmp_path: Path, suffix: str, value: Any, what: str
) -> None:
    path = tmp_path / f"x{suffix}"
    torchkeep.save({"ok": 1}, path)
    before = path.read_bytes()
    with pytest.raises(UnsupportedValueError) as info:
        torchkeep.save({"a": [1, {"b": value}], "w": torch.ones(1)}, path)
    assert "['a'][1]['b']" in str(info.value)
    assert what in str(info.value)
    assert path.read_bytes() == before and temporaries(tmp_path) == []


def test_load_keeps_tensors_mapped(tmp_path: Path) -> None:
    tensors = {f"layer{i}": torch.randn(2 * MIB) for i in range(8)}  # 8 x 8 MiB = 64 MiB
    path = tmp_path / "big.safetensors"
    torchkeep.save(tensors, path)
    small = tmp_path / "small.safetensors"
    torchkeep.save({"x": torch.ones(4)}, small)
    total = sum(float(t.double().sum()) for t in tensors.values())
    out = run_py(
        """
        import torch, torchkeep
        torchkeep.load(sys.argv[2])  # warm up imports
        gc.collect()
        before = rss()
        obj = torchkeep.load(sys.argv[1])
        grown = rss() - before
        total = sum(float(t.double().sum()) for t in obj.values())
        print(grown, total)
        """,
        str(path),
        str(small),
    )
    grown, got = out.split()
    assert int(grown) < 0.5 * 64 * MIB, f"RSS grew by {int(grown) / MIB:.1f} MiB"
    assert math.isclose(float(got), total, rel_tol=1e-9, abs_tol=1e-6)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_writing_to_loaded_tensors_never_changes_the_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"x{suffix}"
    w = torch.randn(64, 64)
    torchkeep.save({"w": w}, path)
    before = path.read_bytes()
    out = torchkeep.load(path)
    out["w"].add_(1.0)
    model = nn.Linear(64, 64, bias=False)
    torchkeep.load_into(model, {"weight": torchkeep.load(path)["w"]})
    with torch.no_grad():
        model.weight.mul_(3)
    assert path.read_bytes() == before
    assert torch.equal(torchkeep.load(path)["w"], w)
