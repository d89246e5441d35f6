"""Formats are told apart by their bytes, never by the file name; non-checkpoints are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import torchkeep
from torchkeep import CorruptCheckpointError

from ..helpers import assert_helpful
from ..models import assert_same


@pytest.mark.parametrize(
    ("written", "renamed"),
    [
        (".safetensors", ".pt"),
        (".safetensors", ""),
        (".safetensors", ".bin"),
        (".pt", ".safetensors"),
        (".pt", ".json"),
    ],
)
def test_format_is_detected_from_bytes_not_suffix(
    tmp_path: Path, written: str, renamed: str
) -> None:
    obj = {"w": torch.randn(3), "step": 4}
    src = tmp_path / f"a{written}"
    torchkeep.save(obj, src)
    dst = tmp_path / f"b{renamed}"
    src.rename(dst)
    assert_same(obj, torchkeep.load(dst))
    assert torchkeep.inspect(dst).tensors[0].name == "w"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00",
        b"hello world, not a checkpoint",
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 64,
        b"PK\x03\x04" + b"\x00" * 60,
        b"\xff" * 100,
        b"{}",
        b'{"weight_map": 3}',
        b"\x80\x04K\x01.",  # a pickle of the int 1
    ],
)
def test_wrong_magic_bytes(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(data)
    for call in (torchkeep.load, torchkeep.inspect):
        with pytest.raises(CorruptCheckpointError) as info:
            call(path)
        assert_helpful(info.value, path)
