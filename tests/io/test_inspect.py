"""torchkeep.inspect and save's metadata: what a file holds, without loading it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import torchkeep
from torchkeep import UnsupportedValueError

from ..helpers import SUFFIXES


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_metadata_round_trip_through_inspect(tmp_path: Path, suffix: str) -> None:
    meta = {"lr": 1e-3, "tags": ["a", "b"], "nested": {"ok": True, "n": None}, "ü": "✓"}
    path = tmp_path / f"x{suffix}"
    torchkeep.save({"w": torch.ones(2)}, path, metadata=meta)
    info = torchkeep.inspect(path)
    assert info.metadata == meta
    assert info.format == ("torchkeep" if suffix == ".safetensors" else "torch-zip")
    assert info.format_version == "1.0"
    assert [(t.name, t.dtype, t.shape) for t in info.tensors] == [("w", "float32", (2,))]


@pytest.mark.parametrize(
    "metadata", [{"x": float("nan")}, {"t": torch.ones(1)}, {"s": {1, 2}}, ["not", "a dict"]]
)
def test_metadata_must_be_json(tmp_path: Path, metadata: Any) -> None:
    path = tmp_path / "x.safetensors"
    with pytest.raises(UnsupportedValueError):
        torchkeep.save({"w": torch.ones(1)}, path, metadata=metadata)
    assert not path.exists()


def test_metadata_with_non_string_keys_is_refused_or_kept(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    meta = {1: "one", "two": 2}
    try:
        torchkeep.save({"w": torch.ones(1)}, path, metadata=meta)
    except UnsupportedValueError:
        assert not path.exists()  # refused before anything was written
        return
    assert torchkeep.inspect(path).metadata == meta


def test_inspect_lists_nested_tensors_and_sharing(tmp_path: Path) -> None:
    w = torch.randn(4, 4)
    path = tmp_path / "x.safetensors"
    torchkeep.save({"model": {"w": w, "tied": w}, "opt": [torch.zeros(3)], "step": 1}, path)
    info = torchkeep.inspect(path)
    names = [t.name for t in info.tensors]
    assert sorted(names) == ["model.tied", "model.w", "opt.0"]
    assert info.shared == {"model.tied": "model.w"}
    assert info.total_bytes == 4 * 4 * 4 + 3 * 4
    assert info.num_params == 16 + 3
    assert info.file_bytes == path.stat().st_size
