"""LocalStorage keeps every promise of the Storage protocol."""

from __future__ import annotations

import errno
import mmap
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO

import pytest

from torchkeep import StorageError
from torchkeep.storage import LocalStorage, Lock, Mapped, Storage, storage_for


@pytest.fixture
def store(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path)


def _put(data: bytes) -> object:
    def write(f: BinaryIO) -> None:
        f.write(data)

    return write


def test_local_storage_is_a_storage_and_chosen_for_paths(tmp_path: Path) -> None:
    assert isinstance(LocalStorage(), Storage)
    assert isinstance(storage_for(tmp_path), LocalStorage)
    assert isinstance(storage_for(str(tmp_path / "x.pt")), LocalStorage)
    with pytest.raises(StorageError, match="no storage for nosuch://"):
        storage_for("nosuch://bucket/run")
    assert isinstance(storage_for("file:///tmp/run"), LocalStorage)


def test_write_read_size_exists_list(store: LocalStorage, tmp_path: Path) -> None:
    store.write_atomic("d/a.bin", lambda f: f.write(b"0123456789") and None)
    assert store.exists("d/a.bin") and store.exists("d") and not store.exists("d/b")
    assert store.size("d/a.bin") == 10
    assert store.read_bytes("d/a.bin") == b"0123456789"
    assert store.list("d") == ["a.bin"] and store.list("missing") == []
    with store.open_read("d/a.bin") as f:
        assert f.read(3) == b"012"
    assert (tmp_path / "d" / "a.bin").read_bytes() == b"0123456789"  # relative to the root
    assert store.read_bytes(str(tmp_path / "d" / "a.bin")) == b"0123456789"  # absolute as is


def test_ranged_reads(store: LocalStorage) -> None:
    store.write_atomic("a", lambda f: f.write(bytes(range(100))) and None)
    assert store.read_bytes("a", 10, 5) == bytes(range(10, 15))
    assert store.read_bytes("a", 95, 50) == bytes(range(95, 100))  # short at the end
    assert store.read_bytes("a", 90) == bytes(range(90, 100))
    assert store.read_bytes("a", length=3) == b"\x00\x01\x02"
    assert store.read_bytes("a", 200, 5) == b""


def test_map_is_one_copy_on_write_mapping(store: LocalStorage, tmp_path: Path) -> None:
    store.write_atomic("a", lambda f: f.write(b"abcdef") and None)
    m = store.map("a")
    assert isinstance(m, Mapped) and isinstance(m.buffer, mmap.mmap)
    st = os.stat(tmp_path / "a")
    assert m.size == 6 and m.identity == (st.st_dev, st.st_ino)
    m.buffer[0:1] = b"X"  # private pages: the file does not change
    assert (tmp_path / "a").read_bytes() == b"abcdef"
    store.write_atomic("a", lambda f: f.write(b"other!") and None)
    assert m.buffer[1:6] == b"bcdef"  # the mapping keeps the file it mapped
    store.write_atomic("empty", lambda f: None)
    assert store.map("empty") == Mapped(buffer=None, size=0, identity=store.map("empty").identity)
    with pytest.raises(FileNotFoundError):  # callers name the missing file themselves
        store.map("missing")


def test_killed_writer_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    LocalStorage().write_atomic(str(target), lambda f: f.write(b"old") and None)
    child = (
        "import os, signal, sys\n"
        "from torchkeep.storage import storage_for\n"
        "def write(f):\n"
        "    f.write(b'half of the new'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
        "storage_for(sys.argv[1]).write_atomic(sys.argv[1], write)\n"
    )
    proc = subprocess.run([sys.executable, "-c", child, str(target)], env=_env(), check=False)
    assert proc.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"old"
    LocalStorage().write_atomic(str(target), lambda f: f.write(b"new") and None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]  # the leftover was swept


def test_create_exclusive(store: LocalStorage, tmp_path: Path) -> None:
    assert store.create_exclusive("m.json", lambda f: f.write(b"first") and None)
    assert not store.create_exclusive("m.json", lambda f: f.write(b"second") and None)
    assert store.read_bytes("m.json") == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]  # no temporary left

    def boom(f: BinaryIO) -> None:
        f.write(b"half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        store.create_exclusive("n.json", boom)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_append_is_all_or_nothing(
    store: LocalStorage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.append("h.jsonl", b"one\n")
    store.append("h.jsonl", b"two\n", durable=True)
    assert store.read_bytes("h.jsonl") == b"one\ntwo\n"
    real = os.write

    def short_then_full(fd: int, data: object) -> int:
        monkeypatch.setattr(os, "write", full)
        return real(fd, bytes(data)[:2])  # type: ignore[call-overload]

    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", short_then_full)
    with pytest.raises(OSError) as info:
        store.append("h.jsonl", b"three\n")
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert store.read_bytes("h.jsonl") == b"one\ntwo\n"  # the half line was truncated away


def test_staging_and_publish(store: LocalStorage, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with store.staging_directory(str(out / "model.onnx")) as staging:
        assert Path(staging).is_dir() and Path(staging).name.startswith(".model.onnx.tkp-")
        for name in ("model.onnx.data", "model.onnx"):
            (Path(staging) / name).write_bytes(name.encode())
        moved = store.publish([f"{staging}/model.onnx.data", f"{staging}/model.onnx"], str(out))
    assert moved == [str(out / "model.onnx.data"), str(out / "model.onnx")]
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.data"]


def test_makedirs_and_remove_tree(store: LocalStorage, tmp_path: Path) -> None:
    store.makedirs("a/b/c")
    store.makedirs("a/b/c")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"x")
    (tmp_path / "a" / "b" / "link").symlink_to(outside)
    store.remove_tree("a")
    assert not (tmp_path / "a").exists()
    assert (outside / "keep").exists()  # a link inside is removed, never followed
    store.remove_tree("a")  # missing is fine
    (tmp_path / "alias").symlink_to(outside)
    with pytest.raises(StorageError):
        store.remove_tree("alias")  # a link at the top is refused
    assert (outside / "keep").exists()
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StorageError):
        store.makedirs("file/x")


def test_delete_never_follows_a_link(store: LocalStorage, tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"precious")
    (tmp_path / "link").symlink_to(target)
    store.delete("link")
    assert not (tmp_path / "link").is_symlink() and target.read_bytes() == b"precious"
    store.delete("link")  # missing is fine
    store.delete("nowhere/x")


def test_delete_files_is_confined(store: LocalStorage, tmp_path: Path) -> None:
    folder, outside = tmp_path / "packs", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    for name in ("a", "b", "c"):
        (folder / name).write_bytes(name.encode())
        (outside / name).write_bytes(name.encode())
    (folder / "l").symlink_to(outside / "a")
    removed = store.delete_files("packs", ["a", "missing", "l"], check=lambda f: True)
    assert removed == ["a"]  # a link is not a regular file: a check never passes it
    assert store.delete_files("packs", ["b", "c"], check=lambda f: f.read() == b"c") == ["c"]
    assert store.delete_files("packs", ["l"]) == ["l"]  # removed as a link
    assert sorted(p.name for p in outside.iterdir()) == ["a", "b", "c"]
    (tmp_path / "alias").symlink_to(outside)
    with pytest.raises(StorageError) as info:
        store.delete_files("alias", ["a"], action="delete unused packs")
    assert info.value.errno == errno.ELOOP and "delete unused packs" in str(info.value)
    assert sorted(p.name for p in outside.iterdir()) == ["a", "b", "c"]
    with pytest.raises(ValueError):
        store.delete_files("packs", ["../outside/a"])
    assert store.delete_files("missing", ["a"]) == []


def test_sweep_temporaries_of_dead_writers(store: LocalStorage, tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = tmp_path / f".a.bin.tkp-{int(dead.stdout)}-00000000"
    live = tmp_path / f".b.bin.tkp-{os.getpid()}-00000000"
    stale.write_bytes(b"")
    live.write_bytes(b"")
    assert store.sweep_temporaries("") == [str(stale)]
    assert live.exists()


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[2] / "src")
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_the_lock_is_exclusive_across_processes(tmp_path: Path) -> None:
    from torchkeep import RunLockedError

    path = tmp_path / ".lock"
    child = (
        "import sys\n"
        "from torchkeep.storage import storage_for\n"
        "lock = storage_for(sys.argv[1]).lock(sys.argv[1]); lock.acquire()\n"
        "print('held', flush=True); sys.stdin.read()\n"
    )
    lock = storage_for(path).lock(str(path))
    with subprocess.Popen(
        [sys.executable, "-c", child, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    ) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline() == "held\n"
            assert isinstance(lock, Lock) and not lock.held
            with pytest.raises(RunLockedError, match=f'"pid": {proc.pid}'):
                lock.acquire()
        finally:
            proc.kill()  # however it dies, the kernel drops its lock
            proc.wait()
    lock.acquire()
    assert lock.held
    lock.release()
    lock.release()  # twice is fine
    assert not lock.held
