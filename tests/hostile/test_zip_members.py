"""Torch zip files whose members lie about themselves: refused cleanly, never run, never raw.

``zipfile`` raises ``NotImplementedError`` when any member declares a "version needed" above 6.3
or a compression method it lacks (from ``ZipFile()`` itself, before any member is read), and
reads the last of two members of one name where torch's own reader may pick the other.
"""

from __future__ import annotations

import os
import pickle
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

import torchkeep as tk

ENTRY_POINTS = {
    "load": lambda p: tk.load(p),
    "inspect": lambda p: tk.inspect(p),
    "scan": lambda p: tk.scan(p),
    "load_into": lambda p: tk.load_into(torch.nn.Linear(2, 2), p, strict=False),
    "verify": lambda p: tk.verify(p),  # reports problems, raises nothing
}


def _patch_member(
    path: Path, member_suffix: str, offset_central: int, offset_local: int, value: bytes
) -> None:
    """Overwrite a field of one member in both its central and its local header."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(member_suffix))
        local = info.header_offset
    central = -1  # this member's entry in the central directory
    pos = 0
    while (pos := data.find(b"PK\x01\x02", pos)) >= 0:
        (name_len,) = struct.unpack("<H", data[pos + 28 : pos + 30])
        if data[pos + 46 : pos + 46 + name_len].decode().endswith(member_suffix):
            central = pos
            break
        pos += 4
    assert central >= 0 and data[local : local + 4] == b"PK\x03\x04"
    data[central + offset_central : central + offset_central + len(value)] = value
    if offset_local >= 0:
        data[local + offset_local : local + offset_local + len(value)] = value
    path.write_bytes(bytes(data))


# (central offset, local offset, value): version needed, compression method, flag bits
FIELDS = {
    "version-needed-9.9": (6, 4, struct.pack("<H", 99)),
    "compression-99": (10, 8, struct.pack("<H", 99)),
    "compression-lzma": (10, 8, struct.pack("<H", 14)),  # method 14, data not lzma
    "encrypted": (8, 6, struct.pack("<H", 0x1)),
    "patched-data": (8, 6, struct.pack("<H", 0x20)),
    "strong-encryption": (8, 6, struct.pack("<H", 0x40)),
}
MEMBERS = ["data.pkl", "torchkeep.json", "/version", "data/0", "byteorder"]


@pytest.mark.parametrize("member", MEMBERS)
@pytest.mark.parametrize("field", list(FIELDS))
def test_hostile_zip_header_fields_raise_only_torchkeep_errors(
    tmp_path: Path, field: str, member: str
) -> None:
    path = tmp_path / "x.pt"
    tk.save({"w": torch.ones(4)}, path)
    central, local, value = FIELDS[field]
    _patch_member(path, member, central, local, value)
    for name, call in ENTRY_POINTS.items():
        try:
            call(path)
        except tk.TorchkeepError:
            continue
        except Exception as exc:  # the bug: a raw exception from zipfile
            pytest.fail(f"{name} raised {type(exc).__name__}: {exc}")


def test_version_needed_above_zipfile_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    tk.save({"w": torch.ones(4)}, path)
    _patch_member(path, "torchkeep.json", *FIELDS["version-needed-9.9"])
    with pytest.raises(tk.CorruptCheckpointError, match="NotImplementedError"):
        tk.load(path)
    with pytest.raises(tk.CorruptCheckpointError):
        tk.inspect(path)
    assert not tk.verify(path).ok


def _with_duplicate(path: Path, member_suffix: str, payload: bytes, *, first: bool) -> None:
    """Rewrite the zip at ``path`` with a second member named like ``member_suffix``."""
    with zipfile.ZipFile(path) as src:
        members = [(i, src.read(i)) for i in src.infolist()]
    name = next(i.filename for i, _ in members if i.filename.endswith(member_suffix))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile: "Duplicate name"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
            if first:
                dst.writestr(name, payload)
            for info, data in members:
                dst.writestr(info, data)
            if not first:
                dst.writestr(name, payload)


class _Evil:
    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (os.system, (f"touch {self.canary}",))


@pytest.mark.parametrize("first", [True, False], ids=["evil-first", "evil-last"])
def test_a_duplicate_data_pkl_is_refused_whichever_copy_torch_reads(
    tmp_path: Path, first: bool
) -> None:
    canary = tmp_path / "CANARY"
    path = tmp_path / "x.pt"
    torch.save({"w": torch.ones(2)}, path)
    _with_duplicate(path, "data.pkl", pickle.dumps(_Evil(canary), protocol=2), first=first)
    with pytest.raises(tk.UnsafeCheckpointError, match="two members named"):
        tk.scan(path)
    with pytest.raises(tk.UnsafeCheckpointError):
        tk.load(path)
    assert not canary.exists()


@pytest.mark.parametrize(
    "member", ["data.pkl", "/version", "data/0", "byteorder", "torchkeep.json"]
)
def test_any_duplicate_member_is_refused_by_the_scan(tmp_path: Path, member: str) -> None:
    path = tmp_path / "x.pt"
    tk.save({"w": torch.ones(2)}, path)
    with zipfile.ZipFile(path) as archive:
        original = archive.read(next(n for n in archive.namelist() if n.endswith(member)))
    _with_duplicate(path, member, original, first=False)  # even an identical copy
    with pytest.raises(tk.UnsafeCheckpointError, match="two members named"):
        tk.scan(path)
    with pytest.raises(tk.UnsafeCheckpointError):
        tk.load(path)
