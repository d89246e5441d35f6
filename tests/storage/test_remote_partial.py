"""Partial loads on ``memory://``: only the tensors a load uses are downloaded, and each of them
is still checked against its hash (``format/_deferred.py``)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import fsspec
import pytest
import torch
from torch import nn

import torchkeep as tk
from torchkeep.storage import observe_transfers

BIG = 4_000_000  # 16 MB of float32: many 1 MiB pages


@pytest.fixture
def root() -> str:
    return f"memory://tk-{uuid.uuid4().hex[:10]}"


@contextmanager
def downloaded() -> Iterator[Callable[[], int]]:
    """The bytes downloaded by lazily mapped objects inside the block (``got()``)."""
    sizes: list[int] = []

    def seen(kind: str, path: str, nbytes: int, total: int | None) -> None:
        if kind == "download":
            sizes.append(nbytes)

    with observe_transfers(seen):
        yield lambda: sum(sizes)


def _saved(root: str) -> tuple[nn.Linear, torch.Tensor, list[str]]:
    torch.manual_seed(0)
    small, big = nn.Linear(4, 3), torch.randn(BIG)
    tk.save({"big": big, "model": small.state_dict()}, f"{root}/f.safetensors")
    with tk.CheckpointManager(f"{root}/run") as mgr:
        mgr.save(1, {"big": big, "model": small})
    return small, big, [f"{root}/f.safetensors", f"{root}/run@latest", f"{root}/run"]


def _objects(root: str) -> list[str]:
    fs = fsspec.filesystem("memory")
    return [f"memory://{p}" for p in fs.find(root) if p.endswith(".safetensors")]


def _flip(url: str, needle: bytes) -> None:
    """Change one byte of ``needle`` (found once) in the object at ``url``."""
    fs = fsspec.filesystem("memory")
    data = bytearray(fs.cat_file(url))
    at = data.find(needle)
    assert at >= 0 and data.find(needle, at + 1) < 0
    data[at + len(needle) // 2] ^= 0x10
    fs.pipe_file(url, bytes(data))


def test_load_into_a_part_downloads_only_its_tensors(root: str) -> None:
    small, big, refs = _saved(root)
    for ref in refs:
        target = nn.Linear(4, 3)
        with downloaded() as got:
            report = tk.load_into(target, ref)
        assert got() < 3 << 20, (ref, got())  # the header's page and the module's: not 16 MB
        assert report.entry == "model" and sorted(report.loaded) == ["bias", "weight"]
        assert torch.equal(target.weight, small.weight) and torch.equal(target.bias, small.bias)
    with downloaded() as got:
        back = tk.load(refs[1])  # a whole load reads everything (and checks everything)
    assert got() >= big.numel() * 4 and torch.equal(back["big"], big)


def test_a_damaged_tensor_that_is_read_is_caught_one_never_read_is_not(root: str) -> None:
    small, big, refs = _saved(root)
    for url in _objects(root):
        _flip(url, big[BIG // 2 : BIG // 2 + 4].numpy().tobytes())
    for ref in refs:
        target = nn.Linear(4, 3)
        tk.load_into(target, ref)  # the damage is in a tensor this load does not use
        assert torch.equal(target.weight, small.weight)
        with pytest.raises(tk.CorruptCheckpointError, match="does not match its hash"):
            tk.load(ref)
    for url in _objects(root):
        _flip(url, small.weight.detach().numpy().tobytes())
    for ref in refs:
        target = nn.Linear(4, 3)
        before = {k: v.clone() for k, v in target.state_dict().items()}
        with pytest.raises(tk.CorruptCheckpointError, match="does not match its hash") as info:
            tk.load_into(target, ref)
        assert info.value.key is not None and info.value.key.endswith("weight")
        assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())  # untouched
        loaded = tk.load_into(target, ref, verify=False)  # told not to check: loads the bytes
        assert loaded.loaded and not torch.equal(target.weight, small.weight)


class _Twins(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.full((1000,), 3.0))
        self.b = nn.Parameter(torch.full((1000,), 3.0))  # equal bytes: stored once in a pack


def test_equal_tensors_stored_once_load_into_memory_of_their_own(root: str) -> None:
    with tk.CheckpointManager(f"{root}/run") as mgr:
        mgr.save(1, {"big": torch.randn(BIG), "model": _Twins()})
    target = _Twins()
    with torch.no_grad():
        target.a.zero_()
        target.b.zero_()
    with downloaded() as got:
        tk.load_into(target, f"{root}/run@latest")
    assert got() < 3 << 20
    assert torch.equal(target.a, torch.full((1000,), 3.0)) and torch.equal(target.a, target.b)
    assert target.a.data_ptr() != target.b.data_ptr()


def _model(big: int) -> nn.Module:
    torch.manual_seed(1)
    return nn.ModuleDict({"head": nn.Linear(4, 3), "body": nn.Linear(big, 1000)})


def test_restore_of_a_part_of_a_model_downloads_only_that_part(root: str) -> None:
    whole = _model(4000)  # 16 MB in the body
    with tk.CheckpointManager(f"{root}/run") as mgr:
        mgr.save(1, {"model": whole, "epoch": 3, "note": torch.arange(5)})
    target = nn.ModuleDict({"head": nn.Linear(4, 3)})
    with (
        tk.CheckpointManager(f"{root}/run") as mgr,
        downloaded() as got,
        pytest.warns(UserWarning, match="loaded partially"),
    ):
        info = mgr.restore({"model": target, "epoch": 0}, strict=False)
    assert got() < 3 << 20
    assert info is not None and info.values["epoch"] == 3
    assert torch.equal(info.values["note"], torch.arange(5))  # handed on: fetched, exact
    assert torch.equal(target["head"].weight, whole["head"].weight)
    (pack,) = [u for u in _objects(root) if "/packs/" in u]
    _flip(pack, whole["head"].weight.detach().numpy().tobytes())
    with (
        tk.CheckpointManager(f"{root}/run") as mgr,
        pytest.warns(UserWarning, match="loaded partially"),
        pytest.raises(tk.CorruptCheckpointError, match="does not match its hash"),
    ):
        mgr.restore({"model": nn.ModuleDict({"head": nn.Linear(4, 3)})}, strict=False)


def test_views_of_a_stored_tensor_are_fetched_through_their_base(root: str) -> None:
    flat = torch.randn(15)
    state = {"big": torch.randn(BIG), "model": {"weight": flat[:12].view(3, 4), "bias": flat[12:]}}
    tk.save(state, f"{root}/views.safetensors")  # one stored tensor, two views of it
    target = nn.Linear(4, 3)
    with downloaded() as got:
        tk.load_into(target, f"{root}/views.safetensors")
    assert got() < 3 << 20
    assert torch.equal(target.weight, flat[:12].view(3, 4)) and torch.equal(target.bias, flat[12:])
