"""A writer killed with SIGKILL at random moments never leaves a broken or half-taken checkpoint."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import torchkeep as tk

WRITER = r"""
import sys, torch, torchkeep as tk
torch.set_num_threads(1)
run, async_save = sys.argv[1], sys.argv[2] == "async"
model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
opt = torch.optim.Adam(model.parameters())
app = {"model": model, "optimizer": opt, "step": 0}
with tk.CheckpointManager(run, keep_last=2, keep_best=1, monitor="loss", async_save=async_save) as mgr:
    info = mgr.restore(app)
    step = info.step + 1 if info else 0
    print("ready", flush=True)
    while True:
        loss = model(torch.randn(8, 256)).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        app["step"] = step
        mgr.save(step, app, metrics={"loss": float(loss.detach())})
        step += 1
"""


def check_run(run: Path, committed_before: int) -> int:
    """Open the run as a writer (which sweeps), load its latest, and check nothing is orphaned."""
    with tk.CheckpointManager(run) as mgr:
        steps = [c.step for c in mgr.checkpoints]
        assert steps, "a committed checkpoint was lost"
        assert steps[-1] >= committed_before
        state = tk.load(f"{run}@latest")
        assert state["step"] == steps[-1]
        assert torch.isfinite(state["model"]["0.weight"]).all()
    used = set()
    for manifest in (run / "checkpoints").iterdir():
        used |= {t["pack"] for t in json.loads(manifest.read_text())["tensors"].values()}
    assert {p.name for p in (run / "packs").iterdir()} == used
    assert not [p for p in run.rglob("*") if ".tkp-" in p.name]
    return steps[-1]


def test_sigkill_while_saving_loses_nothing_committed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    rng = random.Random(1234)
    latest = -1
    kills = int(os.environ.get("TORCHKEEP_KILLS", "50"))
    for i in range(kills):
        mode = "async" if i % 2 else "sync"
        with subprocess.Popen(
            [sys.executable, "-c", WRITER, str(run), mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        ) as child:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == b"ready"
            time.sleep(rng.uniform(0.05, 0.6))
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
        latest = check_run(run, latest)
    assert latest > 0
