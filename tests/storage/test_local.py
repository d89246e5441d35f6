"""Atomic writes on the local filesystem, and LocalStorage."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO

import pytest

from torchkeep import StorageError, TorchkeepError
from torchkeep.storage import LocalStorage, Storage, atomic_write, fsync_dir
from torchkeep.storage._local import sweep_temporaries


def temporaries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tkp-" in p.name)


def test_writes_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    atomic_write(path, lambda f: f.write(b"one"))
    assert path.read_bytes() == b"one"
    atomic_write(path, lambda f: f.write(b"two, longer"))
    assert path.read_bytes() == b"two, longer"
    atomic_write(path, lambda f: f.write(b"3"))
    assert path.read_bytes() == b"3"
    assert temporaries(tmp_path) == []


def test_creates_missing_parents(tmp_path: Path) -> None:
    path = tmp_path / "x" / "y" / "z.bin"
    atomic_write(path, lambda f: f.write(b"ok"))
    assert path.read_bytes() == b"ok"


def test_writes_to_a_hidden_temporary_beside_the_destination(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    seen: list[list[str]] = []

    def write(f: BinaryIO) -> None:
        f.write(b"data")
        seen.append(temporaries(tmp_path))
        assert not path.exists()  # nothing at the destination until the rename

    atomic_write(path, write)
    (names,) = seen
    assert len(names) == 1
    assert names[0].startswith(f".model.safetensors.tkp-{os.getpid()}-")
    assert temporaries(tmp_path) == []


def test_the_file_handed_out_is_readable_and_seekable(tmp_path: Path) -> None:
    def write(f: BinaryIO) -> None:
        f.write(b"hello world")
        f.seek(0)
        assert f.read(5) == b"hello"
        f.seek(0, os.SEEK_END)
        f.write(b"!")

    atomic_write(tmp_path / "a", write)
    assert (tmp_path / "a").read_bytes() == b"hello world!"


def test_a_failing_writer_leaves_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    atomic_write(path, lambda f: f.write(b"previous"))

    class Boom(Exception):
        pass

    def write(f: BinaryIO) -> None:
        f.write(b"half of the new")
        raise Boom

    with pytest.raises(Boom):
        atomic_write(path, write)
    assert path.read_bytes() == b"previous"
    assert temporaries(tmp_path) == []

    def interrupted(f: BinaryIO) -> None:
        f.write(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, interrupted)
    assert path.read_bytes() == b"previous"
    assert temporaries(tmp_path) == []


def test_os_errors_become_storage_errors_with_hints(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"

    def full(f: BinaryIO) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(StorageError) as info:
        atomic_write(path, full)
    err = info.value
    assert isinstance(err, OSError) and isinstance(err, TorchkeepError)
    assert err.errno == errno.ENOSPC
    assert str(path) in str(err) and "full" in (err.hint or "")
    assert not path.exists() and temporaries(tmp_path) == []


def test_failing_fsync_keeps_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "a.bin"
    atomic_write(path, lambda f: f.write(b"previous"))

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", eio)
    with pytest.raises(StorageError) as info:
        atomic_write(path, lambda f: f.write(b"new"))
    monkeypatch.undo()
    assert info.value.errno == errno.EIO
    assert path.read_bytes() == b"previous"
    assert temporaries(tmp_path) == []


def test_failing_rename_keeps_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "a.bin"
    atomic_write(path, lambda f: f.write(b"previous"))

    def denied(src: object, dst: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "replace", denied)
    with pytest.raises(StorageError) as info:
        atomic_write(path, lambda f: f.write(b"new"))
    monkeypatch.undo()
    assert "permission" in (info.value.hint or "").lower()
    assert path.read_bytes() == b"previous"
    assert temporaries(tmp_path) == []


def test_data_and_directory_are_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    atomic_write(tmp_path / "a.bin", lambda f: f.write(b"x"))
    assert any(".a.bin.tkp-" in s for s in synced)  # the data, before the rename
    assert str(tmp_path) in synced  # the directory, after it


def test_destination_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(StorageError) as info:
        atomic_write(tmp_path / "d", lambda f: f.write(b"x"))
    assert info.value.hint
    assert (tmp_path / "d").is_dir()


def test_parent_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StorageError):
        atomic_write(tmp_path / "file" / "x.bin", lambda f: f.write(b"x"))


def test_new_files_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o644


def _dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(proc.stdout)


def test_sweeps_only_leftovers_of_dead_writers_for_that_destination(tmp_path: Path) -> None:
    dead = _dead_pid()
    stale = tmp_path / f".a.bin.tkp-{dead}-deadbeef"
    live = tmp_path / f".a.bin.tkp-{os.getpid()}-cafecafe"
    other = tmp_path / f".b.bin.tkp-{dead}-deadbeef"
    unrelated = tmp_path / ".a.bin.bak"
    odd = tmp_path / ".a.bin.tkp-notapid"
    for p in (stale, live, other, unrelated):
        p.write_bytes(b"junk")
    odd.write_bytes(b"junk")
    atomic_write(tmp_path / "a.bin", lambda f: f.write(b"new"))
    assert not stale.exists()
    assert live.exists()  # a writer still running
    assert other.exists() and unrelated.exists()
    assert (tmp_path / "a.bin").read_bytes() == b"new"
    removed = sweep_temporaries(tmp_path / "b.bin")
    assert removed == [other] and not other.exists()


def test_sweep_in_a_missing_directory(tmp_path: Path) -> None:
    assert sweep_temporaries(tmp_path / "nowhere" / "a.bin") == []


def test_fsync_dir_tolerates_what_it_cannot_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    assert fsync_dir(tmp_path) is None
    assert len(synced) == 1  # a directory it can open is synced
    assert fsync_dir(tmp_path / "missing") is None  # one it cannot open is skipped, no error
    assert len(synced) == 1

    def refuse(fd: int) -> None:
        raise OSError(errno.EINVAL, "fsync of a directory not supported")

    monkeypatch.setattr(os, "fsync", refuse)
    assert fsync_dir(tmp_path) is None  # a filesystem that cannot sync directories is tolerated

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError) as info:  # a real failure is not swallowed
        fsync_dir(tmp_path)
    assert info.value.errno == errno.EIO


# --- LocalStorage -----------------------------------------------------------------------------


def test_local_storage(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "root")
    assert isinstance(store, Storage)
    assert store.list() == [] and not store.exists("a")
    store.write_atomic("a", lambda f: f.write(b"1"))
    store.write_atomic("sub/b", lambda f: f.write(b"2"))
    assert store.read_bytes("a") == b"1" and store.read_bytes("sub/b") == b"2"
    assert store.exists("sub/b")
    assert store.list() == ["a", "sub"] and store.list("sub") == ["b"]
    store.delete("a")
    store.delete("a")  # missing is fine
    assert not store.exists("a")
    with pytest.raises(StorageError) as info:
        store.read_bytes("a")
    assert str(tmp_path / "root" / "a") in str(info.value)
    assert store.list("nowhere") == []
