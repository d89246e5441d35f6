"""Plain DCP directories (``dcp.save``): loaded, inspected, verified and converted; a hostile
``.metadata`` is refused before anything in it runs."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

import torchkeep as tk


@pytest.fixture(scope="module")
def dcp_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    state = {"model": model.state_dict(), "extra": {"epoch": 3, "scale": torch.tensor(2.5)}}
    path = tmp_path_factory.mktemp("dcp") / "ckpt"
    with warnings.catch_warnings():  # DCP warns that it saves in a single process
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=str(path))
    return path, state


def test_load_gives_the_saved_state(dcp_dir: tuple[Path, dict[str, Any]]) -> None:
    path, state = dcp_dir
    loaded = tk.load(path)
    assert sorted(loaded["model"]) == sorted(state["model"])
    for key, value in state["model"].items():
        assert torch.equal(loaded["model"][key], value), key
    assert loaded["extra"]["epoch"] == 3 and torch.equal(
        loaded["extra"]["scale"], torch.tensor(2.5)
    )
    half = tk.load(path, dtype=torch.float16)
    assert half["model"]["0.weight"].dtype == torch.float16


def test_load_into_inspect_verify_convert(
    dcp_dir: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    path, state = dcp_dir
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    report = tk.load_into(model, path)
    assert not report.missing and not report.unexpected
    assert torch.equal(model[0].weight, state["model"]["0.weight"])
    info = tk.inspect(path)
    assert info.format == "dcp" and "model.0.weight" in {t.name for t in info.tensors}
    assert tk.verify(path).ok
    out = tmp_path / "model.safetensors"
    result = subprocess.run(
        [sys.executable, "-m", "torchkeep", "convert", str(path), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert torch.equal(tk.load(out)["model"]["2.bias"], state["model"]["2.bias"])


class _Hostile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.marker}",))


def test_hostile_metadata_is_refused(dcp_dir: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    path, _ = dcp_dir
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in path.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    marker = tmp_path / "pwned"
    (bad / ".metadata").write_bytes(pickle.dumps(_Hostile(marker)))
    for call in (tk.load, tk.inspect):
        with pytest.raises(tk.UnsafeCheckpointError, match=r"would import (os|posix)\.system"):
            call(bad)
    assert not tk.verify(bad).ok
    assert not marker.exists()


def test_metadata_that_is_no_dcp_metadata_is_refused(
    dcp_dir: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    path, _ = dcp_dir
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in path.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / ".metadata").write_bytes(pickle.dumps({"not": "metadata"}))
    with pytest.raises(tk.CorruptCheckpointError, match="not DCP metadata"):
        tk.load(bad)


def test_metadata_claiming_more_than_the_files_hold_is_refused(
    dcp_dir: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    path, _ = dcp_dir
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in path.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    metadata = pickle.loads((path / ".metadata").read_bytes())  # our own file: trusted here
    metadata.state_dict_metadata["model.0.weight"].size = torch.Size([1 << 20, 1 << 20])
    (bad / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(tk.CorruptCheckpointError, match=r"'model.0.weight' claims \d+ bytes"):
        tk.load(bad)
    info = next(iter(metadata.storage_data.values()))
    info.offset = -5
    metadata.state_dict_metadata["model.0.weight"].size = torch.Size([16, 8])
    (bad / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(tk.CorruptCheckpointError, match="offset -5 and length .* are not byte"):
        tk.load(bad)
