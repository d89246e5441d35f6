"""Real processes: concurrent registers and alias moves; SIGKILL during register and delete."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import torchkeep as tk

WORKER = Path(__file__).with_name("_worker.py")


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WORKER), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(procs: list[subprocess.Popen[str]]) -> list[str]:
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=240)
        assert p.returncode == 0, stderr
        out.extend(stdout.split())
    return out


@pytest.mark.slow
def test_concurrent_registers_and_alias_moves(tmp_path: Path) -> None:
    root = str(tmp_path / "models")
    reg = tk.Registry(root)
    for i in range(3):
        reg.register("base", {"w": torch.full((4,), float(i))})
    workers = [_spawn("both", root, "clf", str(seed), "8", "1,2,3") for seed in range(3)]
    time.sleep(0.5)
    Path(root + ".go").touch()
    printed = _finish(workers)
    versions = reg.versions("clf")
    assert sorted(printed, key=int) == [str(n) for n in range(1, 25)]  # none lost, none twice
    assert [v.number for v in versions] == list(range(1, 25))
    assert len({v.fingerprint for v in versions}) == 24
    seen = {(v.metadata["seed"], v.metadata["i"]) for v in versions}
    assert seen == {(s, i) for s in range(3) for i in range(8)}
    moves = reg.alias_history("base", "production")
    assert len(moves) == 24
    assert moves[0].from_version is None
    for before, after in zip(moves, moves[1:], strict=False):
        assert after.from_version == before.to_version  # a consistent chain
    assert reg.resolve("base", "production").version == moves[-1].to_version
    assert len({m.pid for m in moves}) == 3
    assert reg.verify().ok


def _packs(root: Path) -> set[str]:
    return {p.name for p in (root / "packs").iterdir() if not p.name.startswith(".")}


@pytest.mark.slow
def test_sigkill_during_register_and_delete_leaves_a_consistent_registry(tmp_path: Path) -> None:
    root = tmp_path / "models"
    reg = tk.Registry(root)
    for delay in (0.3, 0.55, 0.8):
        p = _spawn("churn", str(root), "clf", "4")
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready"
        time.sleep(delay)
        os.kill(p.pid, signal.SIGKILL)
        p.communicate(timeout=30)  # reaped, pipes closed
        report = reg.verify()
        assert report.ok, report.problems
        for v in reg.versions("clf"):  # every version loads, every tensor hash checked
            assert set(reg.get("clf", v.version)) == {"frozen", "head"}
    assert len(reg.versions("clf")) >= 3
    reg.close()
    reg = tk.Registry(root)  # opening collects what the killed writers left, as runs do
    used = {r[0] for r in reg.conn.execute("SELECT DISTINCT pack FROM tensors")}
    assert _packs(root) == used
    assert not [p for p in (root / "packs").iterdir() if p.name.startswith(".")]
    assert reg.conn.execute("SELECT COUNT(*) FROM pending").fetchone()[0] == 0
    assert reg.verify().ok
