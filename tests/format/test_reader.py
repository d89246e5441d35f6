"""Damaged files of every format are refused as corrupt, never loaded and never a foreign error."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

import torchkeep
from torchkeep import CorruptCheckpointError, TorchkeepError

from ..helpers import SUFFIXES, assert_helpful, tutorial_checkpoint
from ..models import BNNet


@pytest.mark.parametrize("suffix", SUFFIXES + [".legacy"])
@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.1, 0.3, 0.5, 0.9, 0.999])
def test_truncated_file(tmp_path: Path, suffix: str, fraction: float) -> None:
    path = tmp_path / f"x{suffix}"
    ckpt, _, _ = tutorial_checkpoint()
    if suffix == ".legacy":
        torch.save(ckpt, path, _use_new_zipfile_serialization=False)
    else:
        torchkeep.save(ckpt, path)
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * fraction))])
    for call in (torchkeep.load, torchkeep.inspect):
        with pytest.raises(CorruptCheckpointError) as info:
            call(path)
        assert_helpful(info.value, path)
    with pytest.raises(CorruptCheckpointError):
        torchkeep.load_into(BNNet(), path)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_flipped_bytes_never_escape_as_foreign_errors(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"x{suffix}"
    ckpt, _, _ = tutorial_checkpoint()
    torchkeep.save(ckpt, path)
    data = path.read_bytes()
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        pos = int(torch.randint(0, min(len(data), 4096), (1,), generator=g))
        damaged = bytearray(data)
        damaged[pos] ^= 0xFF
        path.write_bytes(bytes(damaged))
        with contextlib.suppress(TorchkeepError):
            torchkeep.load(path)


def test_header_that_lies_about_sizes(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    torchkeep.save({"w": torch.ones(4)}, path)
    data = bytearray(path.read_bytes())
    data[:8] = (len(data) * 2).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError) as info:
        torchkeep.load(path)
    assert_helpful(info.value, path)
