"""torchkeep's own safetensors files: a plain safetensors layout, its document and format version."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from torch import nn

import torchkeep
from torchkeep import CorruptCheckpointError, FormatVersionError

from ..helpers import tutorial_checkpoint
from ..models import MLP, fill_, read_st_header, rewrite_document, write_st


def test_safetensors_suffix_writes_plain_safetensors(tmp_path: Path) -> None:
    ckpt, _, _ = tutorial_checkpoint()
    path = tmp_path / "ckpt.safetensors"
    torchkeep.save(ckpt, path, metadata={"note": "hi"})
    with safetensors.safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert "model_state_dict.fc.weight" in keys
    assert "optimizer_state_dict.state.0.exp_avg" in keys
    assert meta["format"] == "pt"
    assert "torchkeep" in meta and '"note"' in meta["torchkeep"]


def test_torchkeep_files_load_with_safetensors_under_readable_keys(tmp_path: Path) -> None:
    sd = fill_(MLP(), 0).state_dict()
    path = tmp_path / "m.safetensors"
    torchkeep.save(sd, path)
    plain = safetensors.torch.load_file(str(path))
    assert set(plain) == set(sd)
    for k, v in sd.items():
        assert torch.equal(plain[k], v)

    nested = {"epoch": 3, "model_state_dict": sd, "history": [torch.ones(2)]}
    torchkeep.save(nested, path)
    plain = safetensors.torch.load_file(str(path))
    assert set(plain) == {f"model_state_dict.{k}" for k in sd} | {"history.0"}


def test_plain_safetensors_files_load(tmp_path: Path) -> None:
    tensors = {"a.weight": torch.randn(3, 2), "b": torch.arange(5), "c": torch.ones(0)}
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt", "note": "x"})
    out = torchkeep.load(path)
    assert set(out) == set(tensors)
    for k, v in tensors.items():
        assert torch.equal(out[k], v)
    info = torchkeep.inspect(path)
    assert info.format == "safetensors" and info.metadata == {"note": "x"}


def test_newer_major_format_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    torchkeep.save({"w": torch.ones(2)}, path)
    rewrite_document(path, lambda doc: doc.update(format_version="99.0"))
    for read in (torchkeep.load, torchkeep.inspect):
        with pytest.raises(FormatVersionError) as info:
            read(path)
        assert isinstance(info.value, CorruptCheckpointError)
        assert "99.0" in str(info.value) and str(path) in str(info.value)
        assert info.value.hint and "upgrade" in info.value.hint
    with pytest.raises(FormatVersionError):
        torchkeep.load_into(nn.Linear(2, 1), path)


def test_newer_minor_format_version_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    torchkeep.save({"w": torch.ones(2)}, path)
    rewrite_document(path, lambda doc: doc.update(format_version="1.7"))
    assert torch.equal(torchkeep.load(path)["w"], torch.ones(2))


@pytest.mark.parametrize("version", [None, 1, "", "x.0", "-1.0"])
def test_invalid_format_version_is_corrupt(tmp_path: Path, version: Any) -> None:
    path = tmp_path / "x.safetensors"
    torchkeep.save({"w": torch.ones(2)}, path)
    rewrite_document(path, lambda doc: doc.update(format_version=version))
    with pytest.raises(CorruptCheckpointError):
        torchkeep.load(path)


@pytest.mark.parametrize("slot", ["raw", "view"])
def test_a_null_the_writer_never_writes_is_corrupt_not_a_plain_tensor(
    tmp_path: Path, slot: str
) -> None:
    """Found by the header fuzz: a resealed ``"view": null`` loaded the base tensor, a
    ``"raw": {"h": null}`` loaded float8 bytes as uint8, both silently."""
    path = tmp_path / "x.safetensors"
    w = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    torchkeep.save({"w": w, "wt": w.t(), "h": torch.ones(2).to(torch.float8_e8m0fnu)}, path)
    header, data = read_st_header(path)
    doc = json.loads(header["__metadata__"]["torchkeep"])
    if slot == "raw":
        doc["raw"]["h"] = None
    else:
        doc["skeleton"]["v"]["wt"]["view"] = None
    header["__metadata__"]["torchkeep"] = json.dumps(doc)
    write_st(path, header, data)  # sealed again, as the writer seals: only the value is wrong
    with pytest.raises(CorruptCheckpointError, match="raw entry|null view"):
        torchkeep.load(path)
