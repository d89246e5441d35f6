"""Faults on every write path give the right error and leave the right state.

Each write path (``save`` to ``.safetensors`` and ``.pt``, ``save_model``, a run's sync and
async saves, retention and garbage collection) meets ENOSPC, EROFS, EACCES and EIO at each
system call it makes (creating a file, writing, fsync, rename, the directory's fsync, delete):

* before a commit point: ``StorageError`` with that errno and its hint; what was committed
  before still loads and verifies, and no temporary file is left;
* after it (the directory fsync after the rename, the metrics history, retention, GC): the
  save is reported as saved, a ``CleanupWarning`` says what was left, the next save retries.

Errors are injected in-process (root ignores permission bits, so EACCES cannot be provoked
for real); a small tmpfs gives the real ENOSPC and EROFS where this machine can mount one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import torchkeep as tk
from torchkeep.storage import _lock

CODES = [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EIO]
HINTS = {
    errno.ENOSPC: "disk is full",
    errno.EROFS: "read-only",
    errno.EACCES: "permission denied",
    errno.EIO: "I/O error",
}
# The system calls a write makes before its commit point (the rename included).
BEFORE_COMMIT = ["open", "write", "fsync", "replace"]


class Faults:
    """Make chosen ``os`` calls on paths under ``root`` raise ``OSError(code)`` once armed.

    ``ops``: ``open`` (creating a file), ``write`` (through files of ``os.fdopen`` and
    ``os.write``), ``fsync`` (of a file), ``fsync_dir``, ``replace`` (also ``os.link``: the
    conditional create of a new manifest), ``unlink``. ``only``
    narrows the paths further, ``skip`` lets the first matching calls through. Calls on
    other paths pass through untouched.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
        self.root = str(root)
        self.code = 0
        self.ops: set[str] = set()
        self.only: Callable[[str], bool] = lambda _: True
        self.skip = 0
        self.hits: list[tuple[str, str]] = []
        self._fds: dict[int, tuple[str, bool]] = {}  # fd -> (path, is a directory)
        real = {name: getattr(os, name) for name in ("open", "fdopen", "write", "fsync")}
        real_replace, real_unlink = os.replace, os.unlink

        def fail(op: str, path: str) -> None:
            if op in self.ops and path.startswith(self.root) and self.only(path):
                if self.skip > 0:
                    self.skip -= 1
                    return
                self.hits.append((op, path))
                raise OSError(self.code, os.strerror(self.code), path)

        def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            text = os.fspath(path)
            if flags & os.O_CREAT:
                fail("open", text)
            fd: int = real["open"](path, flags, *args, **kwargs)
            self._fds[fd] = (text, bool(flags & getattr(os, "O_DIRECTORY", 0)))
            return fd

        def fdopen(fd: int, *args: Any, **kwargs: Any) -> Any:
            f = real["fdopen"](fd, *args, **kwargs)
            return _FaultyFile(f, lambda: fail("write", self._fds.get(fd, ("", False))[0]))

        def write(fd: int, data: Any) -> int:
            fail("write", self._fds.get(fd, ("", False))[0])
            return real["write"](fd, data)  # type: ignore[no-any-return]

        def fsync(fd: Any) -> None:
            fd = fd if isinstance(fd, int) else fd.fileno()
            path, is_dir = self._fds.get(fd, ("", False))
            fail("fsync_dir" if is_dir else "fsync", path)
            real["fsync"](fd)

        def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            fail("replace", os.fspath(dst))
            real_replace(src, dst, *args, **kwargs)

        real_link = os.link

        def link(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            # A new step's manifest is committed by a conditional create: link(2), not rename.
            fail("replace", os.fspath(dst))
            real_link(src, dst, *args, **kwargs)

        def unlink(path: Any, *args: Any, dir_fd: int | None = None, **kwargs: Any) -> None:
            text = os.fspath(path)
            if dir_fd is not None:  # deletes inside a run go through its folder's descriptor
                text = os.path.join(self._fds.get(dir_fd, ("", False))[0], text)
            fail("unlink", text)
            real_unlink(path, *args, dir_fd=dir_fd, **kwargs)

        for name, fake in (
            ("open", open_),
            ("fdopen", fdopen),
            ("write", write),
            ("fsync", fsync),
            ("replace", replace),
            ("link", link),
            ("unlink", unlink),
        ):
            monkeypatch.setattr(os, name, fake)

    @contextlib.contextmanager
    def on(
        self, code: int, *ops: str, only: Callable[[str], bool] = lambda _: True, skip: int = 0
    ) -> Iterator[Faults]:
        """Fail the matching calls from the ``skip + 1``-th on, until the block ends."""
        self.code, self.ops, self.only, self.skip, self.hits = code, set(ops), only, skip, []
        try:
            yield self
        finally:
            self.ops = set()


class _FaultyFile:
    """An open file whose ``write`` first asks ``check`` (which may raise)."""

    def __init__(self, f: Any, check: Callable[[], None]) -> None:
        self._f = f
        self._check = check

    def write(self, data: Any) -> int:
        self._check()
        return self._f.write(data)  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _FaultyFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


@pytest.fixture
def faults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Faults:
    return Faults(monkeypatch, tmp_path)


def _containing(part: str) -> Callable[[str], bool]:
    return lambda path: part in path


def _temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tkp-" in p.name]


def _assert_storage_error(err: BaseException, code: int) -> None:
    assert isinstance(err, tk.StorageError), repr(err)
    assert err.errno == code, err
    assert HINTS[code] in str(err), str(err)


# --- single files ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("code", CODES)
def test_a_failed_save_keeps_the_previous_file(
    faults: Faults, tmp_path: Path, suffix: str, code: int
) -> None:
    path = tmp_path / f"ckpt{suffix}"
    tk.save({"w": torch.ones(3)}, path)
    for op, skip in [(op, 0) for op in BEFORE_COMMIT] + [("write", 1), ("write", 2)]:
        with faults.on(code, op, skip=skip), pytest.raises(tk.TorchkeepError) as info:
            tk.save({"w": torch.zeros(3)}, path)
        assert faults.hits, op
        _assert_storage_error(info.value, code)
        assert not info.value.committed
        assert torch.equal(tk.load(path)["w"], torch.ones(3)), op
        assert tk.verify(path).ok and _temporaries(tmp_path) == []


@pytest.mark.parametrize("code", CODES)
def test_a_failed_directory_fsync_says_the_file_is_in_place(
    faults: Faults, tmp_path: Path, code: int
) -> None:
    path = tmp_path / "ckpt.safetensors"
    with faults.on(code, "fsync_dir"), pytest.raises(tk.StorageError) as info:
        tk.save({"w": torch.zeros(3)}, path)
    _assert_storage_error(info.value, code)
    assert info.value.committed  # renamed into place; only its durability is in doubt
    assert torch.equal(tk.load(path)["w"], torch.zeros(3))


@pytest.mark.parametrize("code", CODES)
def test_a_failed_save_model_leaves_a_loadable_model(
    faults: Faults, tmp_path: Path, code: int
) -> None:
    from tests.models import MLP

    old, new = MLP(), MLP()
    tk.save_model(old, tmp_path / "m", config={})
    for op in BEFORE_COMMIT:
        for target in ("model.safetensors", "torchkeep_model.json"):
            with (
                faults.on(code, op, only=_containing(target)),
                pytest.raises(tk.StorageError) as info,
            ):
                tk.save_model(new, tmp_path / "m", config={})
            _assert_storage_error(info.value, code)
            loaded = tk.load_model(tmp_path / "m")
            # Two files, each atomic: the weights are the old ones, or (when only the
            # description failed) the new ones; never a mix, never unreadable.
            expected = old if target == "model.safetensors" else new
            assert all(
                torch.equal(v, expected.state_dict()[k]) for k, v in loaded.state_dict().items()
            ), (op, target)
            tk.save_model(old, tmp_path / "m", config={})
    assert _temporaries(tmp_path) == []


def test_disk_full_on_a_pt_path_is_a_storage_error_not_an_unsupported_value(
    faults: Faults, tmp_path: Path
) -> None:
    """torch's zip writer reports a failed write as 'unexpected pos'; the errno must survive.

    (A failure at torch's first write propagates as it is; at a later one torch swallows it.)
    """
    for skip in range(8):
        fault = faults.on(errno.ENOSPC, "write", only=lambda p: ".pt" in p, skip=skip)
        with fault, pytest.raises(tk.TorchkeepError) as info:
            tk.save({"w": torch.ones(1000)}, tmp_path / "x.pt")
        assert faults.hits, skip
        assert not isinstance(info.value, tk.UnsupportedValueError), (skip, str(info.value))
        _assert_storage_error(info.value, errno.ENOSPC)
        assert "unexpected pos" not in str(info.value)


# --- runs -----------------------------------------------------------------------------------


def _app(step: int, size: int = 1 << 15) -> dict[str, Any]:
    return {"w": torch.full((64,), float(step)), "big": torch.full((size,), float(step))}


def _assert_run_intact(run: Path, steps: list[int]) -> None:
    """Exactly ``steps`` are committed, and each verifies and loads with its own values."""
    with tk.CheckpointManager(run, read_only=True) as ro:
        assert [r.step for r in ro.checkpoints] == steps
    report = tk.verify(run)
    assert report.ok, report.problems
    for step in steps:
        loaded = tk.load(f"{run}@{step}")
        assert torch.equal(loaded["w"], _app(step)["w"]), step


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("code", CODES)
def test_a_failed_run_save_is_an_error_and_the_run_stays_as_it_was(
    faults: Faults, tmp_path: Path, code: int, async_save: bool
) -> None:
    run = tmp_path / "run"
    with tk.CheckpointManager(run, keep_last=2, async_save=async_save) as mgr:
        mgr.save(0, _app(0))
        mgr.save(1, _app(1))
        mgr.wait()
        step = 2
        for op in BEFORE_COMMIT:
            for target in ("packs", "checkpoints"):
                with (
                    faults.on(code, op, only=_containing(f"/{target}/")),
                    pytest.raises(tk.StorageError) as info,
                ):
                    mgr.save(step, _app(step))
                    mgr.wait()
                assert faults.hits, (op, target)
                _assert_storage_error(info.value, code)
                _assert_run_intact(run, [step - 2, step - 1])
                assert _temporaries(run) == []
                mgr.save(step, _app(step))  # the manager goes on once the disk is back
                mgr.wait()
                step += 1
    _assert_run_intact(run, [step - 2, step - 1])


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("code", CODES)
def test_what_fails_after_the_commit_is_a_warning_and_is_retried(
    faults: Faults, tmp_path: Path, code: int, async_save: bool
) -> None:
    run = tmp_path / "run"
    # (call, on which path, how many such calls come before the commit point)
    after_commit: list[tuple[str, Callable[[str], bool], int]] = [
        ("fsync_dir", lambda p: p.endswith("/checkpoints"), 0),  # the manifest's rename
        ("open", lambda p: p.endswith("metrics.jsonl"), 0),
        ("write", lambda p: p.endswith("metrics.jsonl"), 0),
        ("unlink", lambda p: "/checkpoints/" in p, 0),  # retention drops a manifest
        ("unlink", lambda p: "/packs/" in p, 0),  # GC drops its pack
        ("fsync_dir", lambda p: p.endswith("/packs"), 1),  # GC, after the pack's own
    ]
    with tk.CheckpointManager(run, keep_last=1, async_save=async_save) as mgr:
        mgr.save(0, _app(0))
        mgr.wait()
        for i, (op, only, skip) in enumerate(after_commit):
            step, retry = 2 * i + 1, 2 * i + 2
            with (
                faults.on(code, op, only=only, skip=skip),
                pytest.warns(tk.CleanupWarning) as caught,
            ):
                record = mgr.save(step, _app(step))
                record = mgr.wait() if async_save else record
            assert faults.hits, op
            assert record is not None and record.step == step  # reported as saved
            assert caught and all(w.category is tk.CleanupWarning for w in caught)
            assert f"step {step} is saved" in str(caught[0].message)
            assert torch.equal(tk.load(f"{run}@{step}")["w"], _app(step)["w"])
            assert tk.verify(f"{run}@{step}").ok
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # the retry succeeds without a warning
                mgr.save(retry, _app(retry))
                mgr.wait()
            _assert_run_intact(run, [retry])
            # What retention or GC left behind was collected by the retry.
            (manifest,) = tk.CheckpointManager(run, read_only=True)._manifests.values()
            packs = {ref.pack for ref in manifest.tensors.values()}
            assert {p.name for p in (run / "packs").iterdir()} == packs, op
            assert mgr.history[-1]["step"] == retry
    steps = [r["step"] for r in tk.CheckpointManager(run, read_only=True).history]
    assert steps == list(range(2 * len(after_commit) + 1))  # the lost lines were written later


def test_a_history_that_cannot_be_written_does_not_fail_the_save(
    faults: Faults, tmp_path: Path
) -> None:
    """The red team's case: metrics.jsonl unwritable made a committed save raise."""
    run = tmp_path / "run"
    with tk.CheckpointManager(run) as mgr:
        with (
            faults.on(errno.EIO, "open", "write", only=_containing("metrics.jsonl")),
            pytest.warns(tk.CleanupWarning, match="metrics"),
        ):
            record = mgr.save(0, _app(0), metrics={"loss": 1.0})
        assert faults.hits
        assert record is not None and record.step == 0
        assert [r.step for r in mgr.checkpoints] == [0]
        mgr.save(1, _app(1), metrics={"loss": 0.5})
        assert [(r["step"], r["metrics"]) for r in mgr.history] == [
            (0, {"loss": 1.0}),
            (1, {"loss": 0.5}),
        ]


@pytest.mark.parametrize("code", CODES)
def test_a_sweep_that_fails_on_open_is_a_warning(faults: Faults, tmp_path: Path, code: int) -> None:
    """Leftovers of a crashed save are invisible to readers: failing to delete them is no
    reason to refuse the run; the next save collects them."""
    run = tmp_path / "run"
    with tk.CheckpointManager(run) as mgr:
        mgr.save(0, _app(0))
    # A whole pack without its manifest, as a crash before the commit leaves it
    stray = run / "packs" / "0000000009-deadbeef.safetensors"
    stray.write_bytes(next((run / "packs").iterdir()).read_bytes())
    with (
        faults.on(code, "unlink", only=_containing("/packs/")),
        pytest.warns(tk.CleanupWarning, match="interrupted save"),
    ):
        mgr = tk.CheckpointManager(run)
    with mgr:
        assert stray.exists()
        mgr.save(1, _app(1))
        assert not stray.exists()
    _assert_run_intact(run, [0, 1])


@pytest.mark.parametrize("code", CODES)
def test_prune_reports_a_failed_delete_as_an_error(
    faults: Faults, tmp_path: Path, code: int
) -> None:
    """An explicit prune is the user's own command: its failure is an error, not a warning."""
    run = tmp_path / "run"
    with tk.CheckpointManager(run) as mgr:
        for step in range(3):
            mgr.save(step, _app(step))
        with faults.on(code, "unlink"), pytest.raises(tk.StorageError) as info:
            mgr.prune(keep_last=1)
        _assert_storage_error(info.value, code)
        _assert_run_intact(run, [0, 1, 2])
        assert mgr.prune(keep_last=1) == [0, 1]
    _assert_run_intact(run, [2])


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES, errno.EIO])
def test_a_lock_that_cannot_be_taken_is_a_storage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    run = tmp_path / "run"
    with tk.CheckpointManager(run) as mgr:
        mgr.save(0, _app(0))

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise OSError(code, os.strerror(code), str(run / ".lock"))

    monkeypatch.setattr(_lock, "open", refuse, raising=False)
    with pytest.raises(tk.StorageError) as info:
        tk.CheckpointManager(run)
    assert info.value.errno == code
    if code == errno.EROFS:
        assert "read-only filesystem" in str(info.value)
    if code != errno.EIO:
        assert "read_only=True" in str(info.value) and "torchkeep ls" in str(info.value)
    with tk.CheckpointManager(run, read_only=True) as ro:  # reading takes no lock
        assert [r.step for r in ro.checkpoints] == [0]
    assert torch.equal(tk.load(f"{run}@0")["w"], _app(0)["w"])


# --- a real small filesystem ----------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs at ``tmp_path/fs``; skipped where this process cannot mount one."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _remount(mnt: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(mnt)], check=True)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_full_tmpfs(tmpfs: Path, suffix: str) -> None:
    path = tmpfs / f"ckpt{suffix}"
    tk.save({"w": torch.ones(3)}, path)
    with pytest.raises(tk.StorageError, match="disk is full") as info:
        tk.save({"w": torch.ones(1 << 20)}, path)  # 4 MiB on 2 MiB
    assert info.value.errno == errno.ENOSPC
    assert torch.equal(tk.load(path)["w"], torch.ones(3)) and _temporaries(tmpfs) == []


def test_a_run_on_a_full_then_read_only_tmpfs(tmpfs: Path) -> None:
    run = tmpfs / "run"
    saved: list[int] = []
    with tk.CheckpointManager(run) as mgr:  # keeps everything: the disk fills up
        with pytest.raises(tk.StorageError, match="disk is full"):
            for step in range(8):
                mgr.save(step, _app(step, size=1 << 17))  # 512 KiB a step
                saved.append(step)
        assert saved and _temporaries(run) == []
        _assert_run_intact(run, saved)
    _remount(tmpfs, "ro")
    try:
        with pytest.raises(tk.StorageError, match="read-only filesystem") as info:
            tk.CheckpointManager(run)
        assert info.value.errno == errno.EROFS and "torchkeep ls" in str(info.value)
        _assert_run_intact(run, saved)  # read-only opening, load and verify still work
        with pytest.raises(tk.StorageError, match="read-only"):
            tk.save({"w": torch.ones(3)}, tmpfs / "x.safetensors")
    finally:
        _remount(tmpfs, "rw")
