"""A single process reads a 64 MiB sharded (FSDP2, 2 ranks) checkpoint whole at about one copy
of the weights: each chunk is hashed and copied from its mapped pack, then its pages dropped;
``convert`` writes it tensor by tensor, never holding the state.

Peak memory is measured in a fresh process: VmHWM (the resident high-water mark, reset to the
current RSS first where /proc/self/clear_refs allows) before and after.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torchkeep as tk
from tests.distributed._fsdp_workers import BIG_MIB
from tests.distributed._launch import launch

WORKERS = Path(__file__).with_name("_fsdp_workers.py")
pytestmark = pytest.mark.slow

_MEASURE = """
import sys
import torch, torchkeep as tk

def hwm():
    try:  # "5" resets the high-water mark to the current RSS (imports peak above it)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))


def peak():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))

what, run, target = sys.argv[1:4]
before = hwm()
if what == "load":
    state = tk.load(run + "@latest")
    assert len(state["model"]) == 4
elif what == "load_into":
    model = torch.nn.Sequential(*(torch.nn.Linear(2048, 2048, bias=False) for _ in range(4)))
    before = hwm()  # the model's own memory is not the load's
    tk.load_into(model, run + "@latest")
else:
    tk.convert(run + "@latest", target)
print((peak() - before) / 1024)
"""


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("big")
    launch("big2", out, 2, workers=WORKERS)
    return out


def _peak_mib(what: str, run: Path, target: Path) -> float:
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, what, str(run), str(target)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    return float(done.stdout.split()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
@pytest.mark.parametrize("what", ["load", "load_into", "convert"])
def test_single_process_read_of_shards_peaks_near_one_copy(big: Path, what: str) -> None:
    target = big / f"{what}.safetensors"
    grown = _peak_mib(what, big / "big", target)
    # before: two copies for load (the shards' pages stayed mapped), three for convert; convert
    # streams tensor by tensor now, chunk by chunk for rows (8 MiB each): far under one copy
    limit = 0.5 if what == "convert" else 1.3
    assert grown <= limit * BIG_MIB, f"{what} grew the peak by {grown:.1f} MiB"
    if what == "convert":  # the file holds every tensor, equal to the checkpoint's
        written, saved = tk.load(target)["model"], tk.load(f"{big / 'big'}@latest")["model"]
        assert written.keys() == saved.keys() and len(saved) == 4
        assert all(torch.equal(written[k], saved[k]) for k in saved)


def test_convert_streams_row_and_column_shards_cast_and_hashed(big: Path, tmp_path: Path) -> None:
    columns = tk.load(big / "columns.safetensors")["weight"]  # saved in two column chunks
    loaded = tk.load(f"{big / 'big'}@latest")
    assert torch.equal(loaded["columns"]["weight"], columns)
    target = tmp_path / "half.safetensors"
    info = tk.convert(f"{big / 'big'}@latest", target, dtype=torch.bfloat16)
    assert info.metadata["step"] == 0 and info.metadata["converted_from"].endswith("big@latest")
    half = tk.load(target)  # verified against the hashes written in its header
    assert torch.equal(half["columns"]["weight"], columns.bfloat16())
    for key, value in loaded["model"].items():
        assert half["model"][key].dtype == torch.bfloat16
        assert torch.equal(half["model"][key], value.bfloat16()), key
    assert tk.verify(target).damaged == 0
    described = {t.name: t for t in tk.inspect(f"{big / 'big'}@latest").tensors}
    assert described["model.0.weight"].shape == (2048, 2048) and len(described) == 5
    assert all(t.shared_with is None for t in described.values())


def test_convert_of_a_damaged_shard_names_it_and_keeps_the_destination(
    big: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(big / "big", run)
    pack = max((run / "packs").iterdir(), key=lambda p: p.stat().st_size)
    data = bytearray(pack.read_bytes())
    data[-1] ^= 0xFF  # the last byte of a shard
    pack.write_bytes(bytes(data))
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"previous")
    with pytest.raises(tk.CorruptCheckpointError) as err:
        tk.convert(f"{run}@latest", target)
    assert "does not match its hash" in str(err.value) and err.value.key is not None
    assert "@" in err.value.key  # the shard's chunk: its tensor and offsets
    assert target.read_bytes() == b"previous"
