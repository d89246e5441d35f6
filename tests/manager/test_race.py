"""A reader beside a writer that saves and prunes sees a whole checkpoint or a clean "pruned".

The writer and the reader are separate processes on the same run. The writer saves as fast as it
can with ``keep_last=2, keep_best=1`` and a random metric, so ``RUN@best`` moves and checkpoints
are pruned under the reader's feet all the time. The reader loops over ``tk.verify(run)``,
``tk.verify(RUN@latest)``, ``tk.load(RUN@latest)``, ``tk.load(RUN@best)``, a read-only manager's
``restore`` and the ``torchkeep verify`` command (in process, then as a process of its own),
and sorts every outcome: ``ok``, ``pruned`` (a
:class:`CheckpointPrunedError`, or a verify report that names pruned checkpoints only in its
notes), ``damage`` (a report with problems, a ``CorruptCheckpointError`` or a failed command: the
run is never damaged here, so each one is false) and ``raw`` (any exception that is not a
``TorchkeepError``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

WRITER = r"""
import os, random, sys, torch, torchkeep as tk
torch.set_num_threads(1)
run, stop, saves = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(7)
model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.Linear(128, 128))
frozen = torch.arange(64 * 1024, dtype=torch.float32)  # 256 KiB, shared by every checkpoint
with tk.CheckpointManager(run, keep_last=2, keep_best=1, monitor="loss") as mgr:
    print("ready", flush=True)
    for step in range(saves):
        if os.path.exists(stop):
            break
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        mgr.save(step, {"model": model, "frozen": frozen, "step": step},
                 metrics={"loss": rng.random()})
print("saved", step, flush=True)
"""

READER = r"""
import io, json, sys, time, contextlib, torch, torchkeep as tk
from typer.testing import CliRunner
from torchkeep.cli import app
torch.set_num_threads(1)
run, rounds, budget = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
pruned_error = getattr(tk, "CheckpointPrunedError", None)
counts = {"reads": 0, "ok": 0, "pruned": 0, "damage": 0, "raw": 0}
samples = {"damage": [], "raw": []}
by_read = {}
runner = CliRunner()

def report(r):
    if not r.ok:
        pruned = all("pruned" in p for p in r.problems)
        return ("pruned" if pruned else "damage"), "; ".join(r.problems)
    return ("pruned" if any("pruned" in n for n in r.notes) else "ok"), ""

def verify_cli():
    result = runner.invoke(app, ["verify", run, f"{run}@latest"])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    if result.exit_code == 0:
        return ("pruned" if "pruned" in result.output else "ok"), ""
    problems = [l for l in result.output.splitlines() if "problem:" in l or "Error" in l]
    return ("pruned" if all("pruned" in l for l in problems) else "damage"), result.output

def restore():
    mgr = tk.CheckpointManager(run, read_only=True)
    app_ = {"model": torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.Linear(128, 128)),
            "frozen": torch.zeros(64 * 1024), "step": 0}
    mgr.restore(app_)
    return "ok", ""

reads = [
    ("verify(run)", lambda: report(tk.verify(run))),
    ("verify(@latest)", lambda: report(tk.verify(f"{run}@latest"))),
    ("load(@latest)", lambda: (tk.load(f"{run}@latest"), ("ok", ""))[1]),
    ("load(@best)", lambda: (tk.load(f"{run}@best"), ("ok", ""))[1]),
    ("restore", restore),
    ("cli verify", verify_cli),
]
start = time.monotonic()
for i in range(rounds):
    if time.monotonic() - start > budget:
        break
    for name, read in reads:
        counts["reads"] += 1
        try:
            outcome, detail = read()
        except tk.CheckpointNotFoundError as exc:
            pruned = pruned_error is not None and isinstance(exc, pruned_error)
            outcome, detail = ("pruned" if pruned else "damage"), str(exc)
        except tk.TorchkeepError as exc:
            outcome, detail = "damage", f"{type(exc).__name__}: {exc}"
        except Exception as exc:
            outcome, detail = "raw", f"{type(exc).__name__}: {exc}"
        counts[outcome] += 1
        by_read.setdefault(name, {}).setdefault(outcome, 0)
        by_read[name][outcome] += 1
        if outcome in samples and len(samples[outcome]) < 5:
            samples[outcome].append(f"{name}: {detail}"[:300])
# The command itself, in processes of its own, while the writer still saves and prunes.
import subprocess
for _ in range(1):
    counts["reads"] += 1
    done = subprocess.run([sys.executable, "-m", "torchkeep", "verify", run],
                          capture_output=True, text=True, timeout=120)
    if "Traceback" in done.stderr:
        outcome = "raw"
    elif done.returncode == 0:
        outcome = "pruned" if "pruned" in done.stdout else "ok"
    else:
        outcome = "damage"
    counts[outcome] += 1
    by_read.setdefault("torchkeep verify", {}).setdefault(outcome, 0)
    by_read["torchkeep verify"][outcome] += 1
    if outcome in samples and len(samples[outcome]) < 5:
        samples[outcome].append(f"torchkeep verify: {done.stdout}{done.stderr}"[:300])
print(json.dumps({"counts": counts, "by_read": by_read, "samples": samples}), flush=True)
"""


def race(run: Path, *, rounds: int, budget: float) -> dict[str, object]:
    """Run a writer and a reader on ``run`` at once; the reader's counts and examples."""
    stop = run.parent / "stop"
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    with subprocess.Popen(
        [sys.executable, "-c", WRITER, str(run), str(stop), "100000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    ) as writer:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == b"ready"
        while not (run / "checkpoints").is_dir() or len(os.listdir(run / "checkpoints")) < 2:
            time.sleep(0.05)
        try:
            reader = subprocess.run(
                [sys.executable, "-c", READER, str(run), str(rounds), str(budget)],
                capture_output=True,
                text=True,
                timeout=budget + 120,
                env=env,
            )
        finally:
            stop.touch()
            out, err = writer.communicate(timeout=60)
    assert writer.returncode == 0, err.decode()
    assert reader.returncode == 0, reader.stderr
    result: dict[str, object] = json.loads(reader.stdout.strip().splitlines()[-1])
    result["saves"] = int(out.decode().split()[-1]) + 1
    return result


@pytest.mark.slow
def test_a_reader_beside_a_pruning_writer_never_sees_false_damage(tmp_path: Path) -> None:
    rounds = int(os.environ.get("TORCHKEEP_RACE_ROUNDS", "80"))
    budget = float(os.environ.get("TORCHKEEP_RACE_SECONDS", "12"))
    result = race(tmp_path / "run", rounds=rounds, budget=budget)
    print(json.dumps(result, indent=1))
    counts = result["counts"]
    assert isinstance(counts, dict)
    assert counts["reads"] >= 60 and result["saves"] >= 20  # type: ignore[operator]
    assert counts["damage"] == 0, result
    assert counts["raw"] == 0, result
    # A prune is the rare answer: @latest, @best and whole-run reads mostly see a checkpoint.
    assert counts["ok"] > counts["pruned"], result
