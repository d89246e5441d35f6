"""Loading a ``.pt2`` never runs code from it unless trusted: the archive is checked first."""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import torchkeep as tk
from tests.export import _models as m
from torchkeep.format._pickle_files import COMPILED_CODE


class _Payload:
    """Unpickling it runs a shell command; the file it creates proves code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., int], tuple[str]]:
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def clean_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pt2") / "model.pt2"
    assert tk.export(m.MLP(), torch.randn(2, 12), path, latency_runs=1).ok
    return path


def _rewrite(src: Path, dest: Path, change: Callable[[str, bytes], bytes | None]) -> Path:
    """Copy the archive, passing each member through ``change`` (None drops it)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = change(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info.filename, data)
    return dest


def _pickled_sample_inputs(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(((_Payload(marker),), {}), buffer)
    return buffer.getvalue()


def test_a_clean_export_loads(clean_pt2: Path) -> None:
    assert tk.load_exported(clean_pt2)(torch.randn(3, 12)).shape == (3, 3)
    scan = tk.scan(clean_pt2)  # the pickle inside (sample inputs) needs only safe globals
    assert scan.is_safe and any("sample_inputs" in r for r in scan.records)


def test_sample_inputs_that_need_code_are_refused_before_torch_runs_them(
    clean_pt2: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    payload = _pickled_sample_inputs(marker)
    bad = _rewrite(
        clean_pt2,
        tmp_path / "bad.pt2",
        lambda name, data: payload if "/data/sample_inputs/" in name else data,
    )
    with pytest.raises(tk.UnsafeCheckpointError, match="sample_inputs"):
        tk.load_exported(bad)
    assert "posix.system" in tk.scan(bad).unsafe  # scan names it, statically
    assert not marker.exists()
    # The trap is real: torch.export.load falls back to weights_only=False and runs it.
    with pytest.raises(Exception):  # noqa: B017 - what fails after the payload ran varies
        torch.export.load(bad)
    assert marker.exists()


def test_pickled_weights_are_refused(clean_pt2: Path, tmp_path: Path) -> None:
    def pickled(name: str, data: bytes) -> bytes:
        if name.endswith("_weights_config.json"):
            config = json.loads(data)
            next(iter(config["config"].values()))["use_pickle"] = True
            return json.dumps(config).encode()
        return data

    bad = _rewrite(clean_pt2, tmp_path / "bad.pt2", pickled)
    with pytest.raises(tk.UnsafeCheckpointError, match="as a pickle"):
        tk.load_exported(bad)


def test_compiled_code_is_refused_unless_trusted(clean_pt2: Path, tmp_path: Path) -> None:
    root = zipfile.ZipFile(clean_pt2).namelist()[0].split("/")[0]
    bad = tmp_path / "aoti.pt2"
    _rewrite(clean_pt2, bad, lambda name, data: data)
    with zipfile.ZipFile(bad, "a") as z:
        z.writestr(f"{root}/data/aotinductor/model/model.so", b"\x7fELF")
    with pytest.raises(tk.UnsafeCheckpointError, match="compiled code"):
        tk.load_exported(bad)
    assert COMPILED_CODE in tk.scan(bad).unsafe
    # Trusted, it reaches torch, which does try to load the library as an AOTInductor package.
    with pytest.raises(tk.ExportError, match="cannot load"):
        tk.load_exported(bad, trust=True)


def test_the_legacy_format_is_refused(clean_pt2: Path, tmp_path: Path) -> None:
    bad = _rewrite(
        clean_pt2,
        tmp_path / "old.pt2",
        lambda name, data: None if name.endswith("/archive_format") else data,
    )
    with pytest.raises(tk.UnsafeCheckpointError, match="pre-2.8 format"):
        tk.load_exported(bad)


def test_members_outside_the_archive_are_corrupt(clean_pt2: Path, tmp_path: Path) -> None:
    bad = tmp_path / "escape.pt2"
    _rewrite(clean_pt2, bad, lambda name, data: data)
    with zipfile.ZipFile(bad, "a") as z:
        z.writestr("../../etc/evil", b"x")
    with pytest.raises(tk.CorruptCheckpointError, match="escapes"):
        tk.load_exported(bad, trust=True)


def test_not_an_archive_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "x.pt2").write_bytes(b"not a zip at all")
    with pytest.raises(tk.CorruptCheckpointError, match="zip"):
        tk.load_exported(tmp_path / "x.pt2")
    with pytest.raises(tk.CheckpointNotFoundError):
        tk.load_exported(tmp_path / "missing.pt2")
