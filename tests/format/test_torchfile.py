"""Files in torch's format: what torchkeep writes, and what it refuses to unpickle without trust."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep
from torchkeep import UnsafeCheckpointError, UnsupportedValueError

from ..helpers import tutorial_checkpoint
from ..models import MLP, assert_same, fill_


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".tar"])
def test_torch_suffixes_write_torch_zip_loadable_with_weights_only(
    tmp_path: Path, suffix: str
) -> None:
    ckpt, _, _ = tutorial_checkpoint()
    path = tmp_path / f"ckpt{suffix}"
    torchkeep.save(ckpt, path, metadata={"step": 3})
    assert path.read_bytes()[:4] == b"PK\x03\x04"
    plain = torch.load(path, weights_only=True)
    assert_same(ckpt, plain)
    assert torchkeep.inspect(path).metadata == {"step": 3}


def test_one_storage_under_two_dtypes_in_torch_format_is_stored_or_refused(
    tmp_path: Path,
) -> None:
    w = torch.randn(4, 4)
    obj = {"w": w, "bits": w.view(torch.int32)}
    path = tmp_path / "x.pt"
    try:
        torchkeep.save(obj, path)
    except UnsupportedValueError as exc:
        assert "safetensors" in str(exc)  # the way out: a format that can hold it
        assert not path.exists()
        return
    out = torchkeep.load(path)
    assert torch.equal(out["w"], w) and torch.equal(out["bits"], obj["bits"])


class _Boom:
    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.canary}",))


@pytest.mark.parametrize("legacy", [False, True])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, legacy: bool) -> None:
    canary = tmp_path / "canary"
    path = tmp_path / "evil.pt"
    torch.save(
        {"w": torch.ones(2), "x": _Boom(canary)},
        path,
        _use_new_zipfile_serialization=not legacy,
    )
    for call in (
        torchkeep.load,
        torchkeep.inspect,
        torchkeep.load_model,
        lambda p: torchkeep.load_into(nn.Linear(1, 1), p),
    ):
        with pytest.raises(UnsafeCheckpointError) as info:
            call(path)
        assert any("system" in g for g in info.value.globals) or "system" in str(info.value)
        assert "trust=True" in str(info.value)
    assert not canary.exists()


def test_full_model_pickle_needs_trust(tmp_path: Path) -> None:
    model = fill_(MLP(), 4).train()
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        torchkeep.load(path)
    assert "tests.models.MLP" in str(info.value)
    with pytest.raises(UnsafeCheckpointError):
        torchkeep.load_model(path)
    loaded = torchkeep.load(path, trust=True)
    assert isinstance(loaded, MLP)
    rebuilt = torchkeep.load_model(path, trust=True)
    assert isinstance(rebuilt, MLP) and not rebuilt.training
    x = torch.randn(5, 4)
    assert torch.equal(rebuilt(x), model.eval()(x))
