"""torchkeep.save is atomic: a crash, a full disk or SIGKILL mid-save leaves the previous file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import torchkeep
from torchkeep import StorageError
from torchkeep.format import _artifact, _torchfile

from ..helpers import ROOT, SUFFIXES, temporaries
from ..models import assert_same


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_crash_mid_save_leaves_previous_file_intact(
    tmp_path: Path, suffix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / f"ckpt{suffix}"
    old = {"w": torch.randn(1000), "step": 1}
    torchkeep.save(old, path)
    before = path.read_bytes()

    class Crash(Exception):
        pass

    if suffix == ".safetensors":
        real = _artifact.write_safetensors

        def half_then_crash(f: Any, tensors: Any, metadata: Any) -> None:
            import io

            buf = io.BytesIO()
            real(buf, tensors, metadata)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            raise Crash

        monkeypatch.setattr(_artifact, "write_safetensors", half_then_crash)
    else:
        real_save = torch.save

        def half_then_crash(obj: Any, f: Any, *a: Any, **k: Any) -> None:
            import io

            buf = io.BytesIO()
            real_save(obj, buf, *a, **k)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            raise Crash

        monkeypatch.setattr(_torchfile.torch, "save", half_then_crash)
    with pytest.raises(Crash):
        torchkeep.save({"w": torch.zeros(1000), "step": 2}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert_same(old, torchkeep.load(path))
    assert temporaries(tmp_path) == []


def test_disk_error_mid_save_is_a_storage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    path = tmp_path / "ckpt.safetensors"
    torchkeep.save({"w": torch.ones(3)}, path)
    before = path.read_bytes()

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StorageError) as info:
        torchkeep.save({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert isinstance(info.value, OSError)
    assert "full" in str(info.value) and str(path) in str(info.value)
    assert path.read_bytes() == before and temporaries(tmp_path) == []


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_sigkill_while_saving_keeps_last_complete_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"ckpt{suffix}"
    code = """
        import sys, torch, torchkeep
        k = 0
        while True:
            k += 1
            torchkeep.save({"step": k, "w": torch.full((4 * 1024 * 1024,), float(k))}, sys.argv[1])
            print(k, flush=True)
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "1"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # kill it while a temporary file is being written
            if any((tmp_path / n).stat().st_size > 0 for n in temporaries(tmp_path)):
                break
            time.sleep(0.0005)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    out = torchkeep.load(path)
    k = out["step"]
    assert k >= 1 and out["w"].shape == (4 * 1024 * 1024,)
    assert out["w"].min() == out["w"].max() == float(k)

    torchkeep.save({"step": 0}, path)  # the next save sweeps what the dead writer left
    assert temporaries(tmp_path) == []
    assert torchkeep.load(path) == {"step": 0}
