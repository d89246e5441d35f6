"""The remote store on ``memory://`` (fsspec's in-memory filesystem): fast unit tests of the seam."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import BinaryIO

import pytest
import torch
from torch import nn

import torchkeep as tk
from torchkeep.storage import Lease, RemotePath, RemoteStorage, local_path, storage_for


@pytest.fixture
def root() -> str:
    return f"memory://tk-{uuid.uuid4().hex[:10]}"


def _put(data: bytes):  # type: ignore[no-untyped-def]
    def write(f: BinaryIO) -> None:
        f.write(data)

    return write


def test_a_url_stays_a_url_through_path_code(root: str) -> None:
    p = local_path(f"{root}/run", {"skip_instance_cache": False})
    assert isinstance(p, RemotePath) and isinstance(p, Path)
    child = p / "packs" / "x.safetensors"
    assert str(child) == f"{root}/run/packs/x.safetensors" == child.__fspath__()
    assert str(child.parent.parent) == f"{root}/run" and child.name == "x.safetensors"
    assert type(child).storage_options == {"skip_instance_cache": False}  # options travel
    assert child.suffix == ".safetensors" and str(child.with_name("y.pt")).endswith("/packs/y.pt")
    assert isinstance(storage_for(child), RemoteStorage)
    assert not Path("memory:").exists()


def test_write_read_list_delete(root: str) -> None:
    store = storage_for(root)
    store.write_atomic(f"{root}/d/a.bin", _put(b"0123456789"))
    assert store.exists(f"{root}/d/a.bin") and not store.exists(f"{root}/d/b.bin")
    assert store.size(f"{root}/d/a.bin") == 10
    assert store.read_bytes(f"{root}/d/a.bin", 2, 3) == b"234"
    assert store.list(f"{root}/d") == ["a.bin"] and store.list(f"{root}/missing") == []
    with store.open_read(f"{root}/d/a.bin") as f:
        assert f.read(3) == b"012"
    store.append(f"{root}/d/log", b"one\n")
    store.append(f"{root}/d/log", b"two\n")
    assert store.read_bytes(f"{root}/d/log") == b"one\ntwo\n"
    assert store.delete_files(f"{root}/d", ["a.bin", "gone"]) == ["a.bin"]
    store.delete(f"{root}/d/log")
    assert store.list(f"{root}/d") == []
    with pytest.raises(FileNotFoundError):
        store.open_read(f"{root}/d/a.bin")


def test_a_failed_write_leaves_the_old_object(root: str) -> None:
    store = storage_for(root)
    store.write_atomic(f"{root}/x", _put(b"old"))

    def half(f: BinaryIO) -> None:
        f.write(b"new and half")
        raise RuntimeError("the writer failed")

    for sequential in (False, True):
        with pytest.raises(RuntimeError):
            store.write_atomic(f"{root}/x", half, sequential=sequential)
        assert store.read_bytes(f"{root}/x") == b"old"


def test_create_exclusive_creates_once(root: str) -> None:
    store = storage_for(root)
    assert store.create_exclusive(f"{root}/m.json", _put(b"first"))
    assert not store.create_exclusive(f"{root}/m.json", _put(b"second"))
    assert store.read_bytes(f"{root}/m.json") == b"first"
    assert store.create_exclusive(f"{root}/m.json", _put(b"first"))  # our own bytes: ours


def test_map_fetches_only_the_ranges_used(root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchkeep.storage._ranges as ranges

    monkeypatch.setattr(ranges, "PAGE_BYTES", 1 << 16)
    monkeypatch.setattr(ranges, "BLOCK_BYTES", 1 << 18)
    a, b = torch.randn(200_000), torch.randn(200_000)  # 800 KB each: many 64 KiB pages
    tk.save({"a": a, "b": b}, f"{root}/two.safetensors")
    mapped = storage_for(root).map(f"{root}/two.safetensors")
    assert mapped.fetch is not None and mapped.size > 1_600_000
    mapped.fetch(0, 100)
    fetched = mapped.fetch.have  # type: ignore[attr-defined]
    assert fetched == {0}  # nothing read ahead on a guess
    mapped.fetch(mapped.size - 10, mapped.size)
    assert fetched == {0, (mapped.size - 1) >> 16}
    mapped.fetch(1 << 16, 10 << 16)  # nine pages: three requests of at most four pages
    assert fetched == {*range(10), (mapped.size - 1) >> 16}
    assert mapped.prefetch is not None
    mapped.prefetch([(0, mapped.size)])
    mapped.fetch(0, mapped.size)  # waits for what the prefetch started
    assert len(fetched) == -(-mapped.size >> 16)
    loaded = tk.load(f"{root}/two.safetensors")
    assert torch.equal(loaded["a"], a) and torch.equal(loaded["b"], b)


def test_the_lease_refuses_a_second_writer_and_expires(root: str) -> None:
    store = storage_for(root)
    first = Lease(store, f"{root}/run/.lock", ttl=0.6)  # type: ignore[arg-type]
    first.acquire()
    try:
        assert first.held
        with pytest.raises(tk.RunLockedError, match="lease expires at"):
            Lease(store, f"{root}/run/.lock", ttl=0.6).acquire()  # type: ignore[arg-type]
        time.sleep(0.5)  # renewed meanwhile (every ttl/3): still held
        with pytest.raises(tk.RunLockedError):
            Lease(store, f"{root}/run/.lock", ttl=0.6).acquire()  # type: ignore[arg-type]
    finally:
        first.release()
    assert not store.exists(f"{root}/run/.lock")
    # A dead writer's lease (never renewed) is taken over once expired.
    store.write_atomic(
        f"{root}/run/.lock",
        _put(
            json.dumps({"kind": "torchkeep-lease", "token": "x", "expires": time.time()}).encode()
        ),
    )
    second = Lease(store, f"{root}/run/.lock", ttl=5)  # type: ignore[arg-type]
    second.acquire()
    assert json.loads(store.read_bytes(f"{root}/run/.lock"))["token"] == second.token
    second.release()


def test_the_api_on_memory_urls(root: str) -> None:
    model = nn.Linear(3, 2)
    tk.save(model.state_dict(), f"{root}/m.pt", storage_options={})
    other = nn.Linear(3, 2)
    assert tk.load_into(other, f"{root}/m.pt").loaded
    assert torch.equal(other.weight, model.weight)
    with tk.CheckpointManager(f"{root}/run", keep_last=2, monitor="loss", mode="min") as mgr:
        for step in range(4):
            mgr.save(step, {"model": model, "step": step}, metrics={"loss": 10.0 - step})
        with pytest.raises(tk.RunLockedError):
            tk.CheckpointManager(f"{root}/run")
    assert tk.load(f"{root}/run@best")["step"] == 3
    assert tk.load(f"{root}/run@2")["step"] == 2
    assert tk.verify(f"{root}/run").ok
    assert tk.diff(f"{root}/run@2", f"{root}/run@3").identical
    info = tk.convert(f"{root}/run@latest", f"{root}/out.safetensors")
    assert info.format in ("torchkeep", "safetensors")
    with pytest.raises(tk.CheckpointNotFoundError, match="unknown selector"):
        tk.load(f"{root}/run@bset")
    with pytest.raises(tk.CheckpointNotFoundError):
        tk.load(f"{root}/nothing.safetensors")
