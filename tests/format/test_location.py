"""``map_location`` and ``dtype`` on load, with torch.load's semantics, for every format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep
from torchkeep import TorchkeepError

from ..models import rewrite_document


def _write(kind: str, obj: Any, path: Path) -> Path:
    if kind == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    elif kind == "torch.save":
        torch.save(obj, path)
    else:
        torchkeep.save(obj, path)
    return path


KINDS = [
    ("torchkeep", ".safetensors"),
    ("torchkeep", ".pt"),
    ("torch.save", ".pt"),
    ("legacy", ".pt"),
]


@pytest.mark.parametrize(("kind", "suffix"), KINDS)
@pytest.mark.parametrize(
    "map_location", ["cpu", torch.device("cpu"), {"cpu": "cpu"}], ids=["str", "device", "dict"]
)
def test_map_location_forms(tmp_path: Path, kind: str, suffix: str, map_location: Any) -> None:
    obj = {"w": torch.randn(3, 2), "b": torch.arange(3), "w_t": None}
    obj["w_t"] = obj["w"].t()
    out = torchkeep.load(_write(kind, obj, tmp_path / f"x{suffix}"), map_location=map_location)
    for k in ("w", "b", "w_t"):
        assert out[k].device == torch.device("cpu") and torch.equal(out[k], obj[k])


@pytest.mark.parametrize(("kind", "suffix"), KINDS)
def test_map_location_callable(tmp_path: Path, kind: str, suffix: str) -> None:
    obj = {"w": torch.randn(3, 2), "b": torch.arange(3)}
    calls: list[str] = []

    def keep(storage: Any, loc: str) -> Any:
        calls.append(loc)
        return storage

    out = torchkeep.load(_write(kind, obj, tmp_path / f"x{suffix}"), map_location=keep)
    assert calls and set(calls) == {"cpu"}
    assert torch.equal(out["w"], obj["w"]) and torch.equal(out["b"], obj["b"])
    out2 = torchkeep.load(tmp_path / f"x{suffix}", map_location=lambda storage, loc: storage)
    assert torch.equal(out2["w"], obj["w"])


@pytest.mark.parametrize(("kind", "suffix"), KINDS)
def test_map_location_to_an_absent_device_is_a_torchkeep_error(
    tmp_path: Path, kind: str, suffix: str
) -> None:
    path = _write(kind, {"w": torch.randn(2)}, tmp_path / f"x{suffix}")
    with pytest.raises(torchkeep.InvalidArgumentError) as info:
        torchkeep.load(path, map_location="cuda:97")
    assert str(path) in str(info.value)


def test_map_location_moves_tensors_saved_on_another_device(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    torchkeep.save({"w": torch.randn(2, 2), "b": torch.ones(1)}, path)
    expected = torchkeep.load(path)["w"].clone()

    def saved_on_gpu(doc: dict[str, Any]) -> None:
        doc["skeleton"]["v"]["w"]["dev"] = "cuda:97"

    rewrite_document(path, saved_on_gpu)
    with pytest.raises(TorchkeepError):
        torchkeep.load(path)  # no such device here
    for ml in ("cpu", {"cuda:97": "cpu"}, torch.device("cpu")):
        out = torchkeep.load(path, map_location=ml)
        assert out["w"].device.type == "cpu" and torch.equal(out["w"], expected)
    seen: list[str] = []
    out = torchkeep.load(path, map_location=lambda s, loc: seen.append(loc) or s)
    assert "cuda:97" in seen and torch.equal(out["w"], expected)


@pytest.mark.parametrize(("kind", "suffix"), KINDS)
def test_dtype_casts_floating_tensors_only(tmp_path: Path, kind: str, suffix: str) -> None:
    obj = {
        "f32": torch.randn(3),
        "f64": torch.randn(3, dtype=torch.float64),
        "bf16": torch.randn(3).bfloat16(),
        "i64": torch.arange(3),
        "u8": torch.arange(3, dtype=torch.uint8),
        "flag": torch.tensor([True, False]),
        "c64": torch.randn(2, dtype=torch.complex64),
        "param": nn.Parameter(torch.randn(2)),
        "epoch": 3,
        "lr": 0.5,
    }
    out = torchkeep.load(_write(kind, obj, tmp_path / f"x{suffix}"), dtype=torch.float16)
    for k in ("f32", "f64", "bf16", "param"):
        assert out[k].dtype == torch.float16, k
        assert torch.equal(out[k], obj[k].detach().to(torch.float16)), k
    for k in ("i64", "u8", "flag", "c64"):
        assert out[k].dtype == obj[k].dtype and torch.equal(out[k], obj[k]), k
    assert isinstance(out["param"], nn.Parameter)
    assert out["epoch"] == 3 and type(out["epoch"]) is int and out["lr"] == 0.5
