"""Damaged files of every format are refused as corrupt, never loaded and never a foreign error."""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import pytest
import torch

import torchkeep
from torchkeep import CorruptCheckpointError

from ..helpers import SUFFIXES, assert_helpful, tutorial_checkpoint
from ..models import BNNet, assert_same, read_st_header


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


def tensor_data_spans(path: Path) -> list[tuple[int, int]]:
    """``(start, end)`` file offsets of the stored tensor bytes of a torchkeep file."""
    raw = path.read_bytes()
    if raw[:4] != b"PK\x03\x04":  # safetensors: the data follows the 8-byte length and header
        header, data = read_st_header(path)
        base = len(raw) - len(data)
        return [
            (base + e["data_offsets"][0], base + e["data_offsets"][1])
            for k, e in header.items()
            if k != "__metadata__" and e["data_offsets"][1] > e["data_offsets"][0]
        ]
    spans = []
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if "/data/" in info.filename and info.file_size:
                at = info.header_offset
                name_len, extra_len = struct.unpack("<HH", raw[at + 26 : at + 30])
                start = at + 30 + name_len + extra_len
                spans.append((start, start + info.file_size))
    return spans


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_flipped_bytes_never_escape_as_foreign_errors(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"x{suffix}"
    ckpt, _, _ = tutorial_checkpoint()
    torchkeep.save(ckpt, path)
    data = path.read_bytes()
    spans = tensor_data_spans(path)
    assert spans and max(end for _, end in spans) > 4096  # tensor bytes lie past the first 4 KiB
    g = torch.Generator().manual_seed(0)
    offsets = {int(i) for i in torch.randint(0, len(data), (40,), generator=g)}
    offsets |= {len(data) * k // 16 for k in range(16)} | {len(data) - 1, len(data) - 2}
    offsets |= {p for start, end in spans for p in (start, (start + end) // 2, end - 1)}
    loaded_intact = []
    for pos in sorted(offsets):
        damaged = bytearray(data)
        damaged[pos] ^= 0xFF
        path.write_bytes(bytes(damaged))
        try:
            out = torchkeep.load(path)
        except CorruptCheckpointError as exc:
            assert str(path) in str(exc), pos
            continue
        # a flip torch never reads (zip padding, a timestamp) may load, but only the originals
        assert_same(ckpt, out, where=f"flip at {pos}")
        loaded_intact.append(pos)
    in_data = [p for p in loaded_intact if any(s <= p < e for s, e in spans)]
    assert not in_data, f"flips inside tensor data at {in_data} were not detected"


def test_header_that_lies_about_sizes(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    torchkeep.save({"w": torch.ones(4)}, path)
    data = bytearray(path.read_bytes())
    data[:8] = (len(data) * 2).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError) as info:
        torchkeep.load(path)
    assert_helpful(info.value, path)
