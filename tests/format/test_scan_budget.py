"""The static pickle scan is bounded: a crafted pickle is refused quickly, never scanned for minutes.

A red team's 400 KB torch zip, whose deflated ``data.pkl`` is 400 MB of opcodes, kept the scanner
busy for 11 minutes and 3 GB before a raw ``MemoryError``; a 10 KB one took 30 s and came out
"clean". Every limit of the scan (opcodes, stack, memo, time, inflation) is exercised here, on
every kind of input the scanner reads.
"""

from __future__ import annotations

import pickle
import struct
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import torchkeep as tk
from torchkeep.format import _pickle_scan
from torchkeep.format._pickle_files import scan_file
from torchkeep.format._pickle_scan import scan_pickle_bytes

MIB = 1 << 20


def _opcode_bomb(path: Path, mib: int, pattern: bytes = b"]0") -> Path:
    """A torch-like zip whose deflated data.pkl is ``mib`` MiB of ``pattern`` (streamed)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        with archive.open("archive/data.pkl", "w", force_zip64=True) as member:
            member.write(b"\x80\x02")
            chunk = pattern * (MIB // len(pattern))
            for _ in range(mib):
                member.write(chunk)
            member.write(b"N.")
        archive.writestr("archive/version", "3\n")
    return path


@pytest.mark.parametrize("mib", [10, 400])
def test_a_deflated_opcode_bomb_is_refused_within_two_seconds(tmp_path: Path, mib: int) -> None:
    path = _opcode_bomb(tmp_path / "bomb.pt", mib)
    assert path.stat().st_size < mib * 1100  # ~1000:1
    start = time.monotonic()
    with pytest.raises(tk.UnsafeCheckpointError, match="zip bomb") as err:
        scan_file(path)
    assert time.monotonic() - start < 2.0
    assert err.value.path == str(path) and "archive/data.pkl" in str(err.value)
    with pytest.raises(tk.UnsafeCheckpointError, match="zip bomb"):
        tk.load(path)
    assert time.monotonic() - start < 4.0


def test_many_records_that_inflate_together_are_refused(tmp_path: Path) -> None:
    # each record is under the 1 MiB floor; all of them together are not
    path = tmp_path / "many.pt"
    body = b"\x80\x02" + b"]0" * (MIB // 2 - 4) + b"N."
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for i in range(5):
            archive.writestr(f"archive/r{i}.pkl", body)
    with pytest.raises(tk.UnsafeCheckpointError, match="the .pkl records"):
        scan_file(path)


def test_a_lying_compressed_size_does_not_buy_a_bigger_budget(tmp_path: Path) -> None:
    path = _opcode_bomb(tmp_path / "bomb.pt", 10)
    data = bytearray(path.read_bytes())
    central = data.find(b"PK\x01\x02")  # data.pkl's entry: its compressed size at +20
    assert struct.unpack("<I", data[central + 20 : central + 24])[0] < 20_000
    data[central + 20 : central + 24] = struct.pack("<I", 0xFFFFFFF0)  # "4 GiB compressed"
    path.write_bytes(bytes(data))
    with pytest.raises(tk.UnsafeCheckpointError, match="zip bomb"):
        scan_file(path)


# -- every limit, on every input the scanner reads ---------------------------------------------


def _memo_strings(n: int) -> bytes:
    # n distinct short strings, each memoized under its own LONG_BINPUT index, then popped
    return b"".join(b"X\x01\x00\x00\x00a" + b"r" + struct.pack("<I", i) + b"0" for i in range(n))


BODIES: dict[str, tuple[str, int, bytes, str]] = {
    # limit name, lowered value, opcodes (between PROTO 2 and STOP), what the error says
    "opcodes": ("MAX_OPCODES", 20_000, b"N0" * 30_000, "opcodes"),
    "stack": ("MAX_STACK", 10_000, b"]" * 30_000, "stack"),
    "memo": ("MAX_MEMO", 10_000, _memo_strings(30_000), "memo"),
    "time": ("MAX_SCAN_SECONDS", 0, b"N0" * 30_000, "s of scanning"),
}


def _as_zip(tmp_path: Path, pickle_bytes: bytes) -> Callable[[], object]:
    path = tmp_path / "x.pt"
    with zipfile.ZipFile(path, "w") as archive:  # stored, as torch.save writes it
        archive.writestr("archive/data.pkl", pickle_bytes)
    return lambda: scan_file(path)


def _as_bare(tmp_path: Path, pickle_bytes: bytes) -> Callable[[], object]:
    path = tmp_path / "x.bin"
    path.write_bytes(pickle_bytes)
    return lambda: scan_file(path)


def _as_export(tmp_path: Path, pickle_bytes: bytes) -> Callable[[], object]:
    path = tmp_path / "x.pt2"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("m/archive_format", "pt2")
        archive.writestr("m/data/sample_inputs/model.pt", pickle_bytes)
    return lambda: scan_file(path)


CONTAINERS = {
    "zip": _as_zip,
    "bare": _as_bare,
    "export": _as_export,
    "bytes": lambda _tmp, data: lambda: scan_pickle_bytes(data),
}


@pytest.mark.parametrize("container", list(CONTAINERS))
@pytest.mark.parametrize("body", list(BODIES))
def test_every_scan_limit_holds_for_every_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str, container: str
) -> None:
    limit, value, ops, message = BODIES[body]
    pickle_bytes = b"\x80\x02" + ops + b"N."
    scan = CONTAINERS[container](tmp_path, pickle_bytes)
    scan()  # within the default limits: scanned, nothing to report
    monkeypatch.setattr(_pickle_scan, limit, value)
    with pytest.raises(tk.UnsafeCheckpointError, match=message) as err:
        scan()
    assert "trust=True" in str(err.value)  # the way out, for a file the user trusts


def test_real_checkpoints_stay_far_inside_the_budget(tmp_path: Path) -> None:
    state = {f"layers.{i}.weight": torch.zeros(1) for i in range(2000)}
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1)) for _ in range(500)])
    state["optimizer"] = opt.state_dict()
    path = tmp_path / "real.pt"
    torch.save(state, path)
    assert scan_file(path).is_safe
    # a deflated copy of a real pickle inflates ~4:1, far from the 50:1 limit
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp_path / "deflated.pt", "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info), compress_type=zipfile.ZIP_DEFLATED)
    assert scan_file(tmp_path / "deflated.pt").is_safe


def test_memo_holds_only_strings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_pickle_scan, "MAX_MEMO", 1000)
    # memoized non-strings cost no memo entries (the memo limit counts strings only)
    data = pickle.dumps([[i] for i in range(20_000)], protocol=2)
    assert scan_pickle_bytes(data)[0] == []
