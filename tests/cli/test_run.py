"""``torchkeep ls | prune | plot`` on runs written by ``CheckpointManager``."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import torchkeep as tk
from torchkeep.cli import app
from torchkeep.cli._plot import metric_history

from ._helpers import ANSI, BOX, TERMINAL_ENV, assert_clean_error

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEPS = [10, 20, 30, 40, 50, 60]
VAL_LOSS = [1.0, 0.6, 0.3, 0.5, 0.45, 0.4]  # the best is step 30
BEST, LATEST = 30, 60
ISO_SECONDS = re.compile(r"\b\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\b")


def make_run(path: Path, steps: list[int] = STEPS, **policy: Any) -> Path:
    """A run of a small model saved at ``steps``; ``acc`` is logged from the third save on."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    app_state: dict[str, Any] = {"model": model, "step": 0}
    with tk.CheckpointManager(path, **policy) as mgr:
        for i, step in enumerate(steps):
            with torch.no_grad():
                model.weight.add_(1.0)
            app_state["step"] = step
            metrics: dict[str, float] = {"val_loss": VAL_LOSS[i % len(VAL_LOSS)]}
            if i >= 2:
                metrics["acc"] = 0.5 + 0.05 * i
            mgr.save(step, app_state, metrics=metrics)
    return path


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """Six checkpoints, all kept (no retention rule), ranked by ``val_loss``."""
    return make_run(tmp_path / "exp1", monitor="val_loss", mode="min")


def manifests(run: Path) -> list[str]:
    return sorted(os.listdir(run / "checkpoints"))


def files(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())


def row(out: str, step: int) -> str:
    """The table row of ``step`` (a line that starts with it)."""
    found = [line for line in out.splitlines() if re.match(rf"^\s*{step}\s", line)]
    assert len(found) == 1, out
    return found[0]


# ---------------------------------------------------------------------------------------------
# ls


def test_ls_piped(runner: CliRunner, run: Path) -> None:
    result = runner.invoke(app, ["ls", str(run)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    header = out.splitlines()[0].split()
    assert header[:3] == ["step", "mark", "time"]
    assert {"val_loss", "acc", "size"} <= set(header)  # a column per metric, union of names
    for step in STEPS:
        assert ISO_SECONDS.search(row(out, step))
    assert row(out, BEST).split()[1] == "best"
    assert row(out, LATEST).split()[1] == "latest"
    assert row(out, 10).split()[1] == "-"
    assert row(out, 10).split()[header.index("acc")] == "-"  # not logged at step 10
    assert row(out, BEST).split()[header.index("val_loss")] == "0.3"
    assert row(out, BEST).endswith("  best,no retention rule")  # kept because
    assert re.search(
        r"^policy +keep everything \(no retention rule\); best = min val_loss$", out, re.M
    )
    assert re.search(r"^checkpoints +6 \(6 saved in all\)$", out, re.M)
    on_disk = sum(p.stat().st_size for p in run.rglob("*") if p.is_file())
    assert f"({on_disk:,} bytes)" in out
    assert not ANSI.search(out)
    assert not BOX.search(out)
    assert result.stderr == ""


def test_ls_json(runner: CliRunner, tmp_path: Path) -> None:
    run = make_run(tmp_path / "r", keep_last=2, keep_best=1, monitor="val_loss", mode="min")
    result = runner.invoke(app, ["ls", "--json", str(run)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["run"] == str(run)
    assert data["policy"] == {
        "keep_last": 2,
        "keep_best": 1,
        "keep_every": None,
        "monitor": "val_loss",
        "mode": "min",
    }
    checkpoints = data["checkpoints"]
    assert [c["step"] for c in checkpoints] == [BEST, 50, LATEST]
    kept = {c["step"]: c["kept"] for c in checkpoints}
    assert kept == {BEST: ["best", "keep_best"], 50: ["keep_last"], LATEST: ["latest", "keep_last"]}
    assert checkpoints[0]["metrics"] == {"val_loss": 0.3, "acc": 0.6}
    assert (data["latest"], data["best"]) == (LATEST, BEST)
    with tk.CheckpointManager(run, read_only=True) as mgr:
        assert checkpoints == json.loads(json.dumps([r.to_dict() for r in mgr.checkpoints]))


@pytest.mark.usefixtures("terminal_env")
def test_ls_on_a_terminal(runner: CliRunner, run: Path) -> None:
    result = runner.invoke(app, ["ls", str(run)])
    assert result.exit_code == 0, result.output
    assert BOX.search(result.stdout)
    assert "val_loss" in result.stdout


def test_ls_of_an_empty_run(runner: CliRunner, tmp_path: Path) -> None:
    tk.CheckpointManager(tmp_path / "empty").close()
    result = runner.invoke(app, ["ls", str(tmp_path / "empty")])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("no checkpoints yet\n")
    data = json.loads(runner.invoke(app, ["ls", "--json", str(tmp_path / "empty")]).stdout)
    assert (data["checkpoints"], data["latest"], data["best"]) == ([], None, None)


@pytest.mark.parametrize("what", ["directory", "missing", "file"])
def test_ls_of_no_run_is_an_error(runner: CliRunner, tmp_path: Path, what: str) -> None:
    path = tmp_path / "x"
    if what == "directory":
        path.mkdir()
    elif what == "file":
        path.write_text("hello")
    result = runner.invoke(app, ["ls", str(path)])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert_clean_error(result.stderr, "CheckpointNotFoundError")
    assert "not a torchkeep run" in result.stderr
    assert not (path / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------
# prune


def test_prune_dry_run_changes_nothing(runner: CliRunner, run: Path) -> None:
    before = files(run)
    result = runner.invoke(app, ["prune", str(run), "--keep-last", "1", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert files(run) == before
    out = result.stdout
    assert "would delete 4 checkpoint(s): 10, 20, 40, 50" in out
    assert "kept 2 checkpoint(s): 30, 60" in out
    assert "dry run: nothing was deleted" in out
    assert row(out, 10).split()[1:3] == ["would", "delete"]
    assert row(out, BEST).split()[1:] == ["keep", "best"]


def test_prune_keep_last(runner: CliRunner, run: Path) -> None:
    result = runner.invoke(app, ["prune", str(run), "--keep-last", "1"])
    assert result.exit_code == 0, result.output
    assert "deleted 4 checkpoint(s): 10, 20, 40, 50" in result.stdout
    assert "on disk: " in result.stdout
    # The latest and the best always stay; the run's own policy is unchanged.
    assert manifests(run) == ["0000000030.json", "0000000060.json"]
    with tk.CheckpointManager(run, read_only=True) as mgr:
        assert [r.step for r in mgr.checkpoints] == [BEST, LATEST]
        assert mgr.policy.keep_last is None
        assert len(mgr.history) == len(STEPS)
    assert tk.load(f"{run}@best")["step"] == BEST
    assert tk.load(f"{run}@latest")["step"] == LATEST


def test_prune_json_and_rules(runner: CliRunner, run: Path) -> None:
    args = ["prune", str(run), "--keep-every", "20", "--keep-best", "2", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["dry_run"] is False
    assert data["deleted"] == [10, 50]
    kept = {k["step"]: k["kept"] for k in data["kept"]}
    assert kept == {
        20: ["keep_every"],
        30: ["best", "keep_best"],
        40: ["keep_every"],
        60: ["latest", "keep_every", "keep_best"],  # val_loss 0.4: second best
    }
    assert data["disk_bytes_after"] < data["disk_bytes_before"]
    assert manifests(run) == [f"{s:010d}.json" for s in (20, 30, 40, 60)]


def test_prune_needs_a_rule(runner: CliRunner, run: Path) -> None:
    before = files(run)
    result = runner.invoke(app, ["prune", str(run)])
    assert result.exit_code == 2
    assert "give at least one rule: --keep-last, --keep-best or --keep-every" in result.output
    assert runner.invoke(app, ["prune", str(run), "--keep-last", "0"]).exit_code == 2
    assert files(run) == before


def test_prune_keep_best_without_a_monitor(runner: CliRunner, tmp_path: Path) -> None:
    run = make_run(tmp_path / "r", steps=[1, 2])
    result = runner.invoke(app, ["prune", str(run), "--keep-best", "1"])
    assert result.exit_code == 1
    assert_clean_error(result.stderr, "InvalidArgumentError")
    assert "keep_best needs a metric" in result.stderr


def test_prune_never_creates_a_run(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["prune", str(tmp_path / "typo"), "--keep-last", "1"])
    assert result.exit_code == 1
    assert_clean_error(result.stderr, "CheckpointNotFoundError")
    assert not (tmp_path / "typo").exists()


def test_prune_of_a_locked_run(runner: CliRunner, run: Path) -> None:
    before = files(run)
    with tk.CheckpointManager(run):  # a writer holds the lock (flock: per open file)
        result = runner.invoke(app, ["prune", str(run), "--keep-last", "1"])
        assert result.exit_code == 1
        assert_clean_error(result.stderr, "RunLockedError")
        assert result.stderr.startswith("RunLockedError: ")
        assert "locked by a writer" in result.stderr
        # A dry run only reads: it works while the writer runs.
        dry = runner.invoke(app, ["prune", str(run), "--keep-last", "1", "--dry-run"])
        assert dry.exit_code == 0, dry.output
    assert files(run) == before


@pytest.fixture
def writer_process(run: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process that holds the run's writer lock until it is killed."""
    code = (
        "import sys, time, torchkeep as tk\n"
        "mgr = tk.CheckpointManager(sys.argv[1])\n"
        "print('locked', flush=True)\n"
        "time.sleep(120)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in TERMINAL_ENV}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_ls_and_plot_work_while_another_process_writes(
    runner: CliRunner, run: Path, tmp_path: Path, writer_process: subprocess.Popen[str]
) -> None:
    listed = runner.invoke(app, ["ls", str(run)])
    assert listed.exit_code == 0, listed.output
    assert "latest" in row(listed.stdout, LATEST)
    plotted = runner.invoke(app, ["plot", str(run), "-o", str(tmp_path / "c.png")])
    assert plotted.exit_code == 0, plotted.output
    pruned = runner.invoke(app, ["prune", str(run), "--keep-last", "1"])
    assert pruned.exit_code == 1
    assert_clean_error(pruned.stderr, "RunLockedError")
    assert f'"pid": {writer_process.pid}' in pruned.stderr  # names the writer
    assert len(manifests(run)) == len(STEPS)


# ---------------------------------------------------------------------------------------------
# plot


def test_plot_writes_a_png(runner: CliRunner, run: Path, tmp_path: Path) -> None:
    out = tmp_path / "curves.png"
    result = runner.invoke(app, ["plot", str(run), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"wrote {out}\n"
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 10_000


def test_plot_chosen_metrics_and_other_formats(
    runner: CliRunner, run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "loss.svg"
    result = runner.invoke(
        app, ["plot", str(run), "--output", str(out), "--metric", "val_loss", "-m", "acc"]
    )
    assert result.exit_code == 0, result.output
    assert out.read_text().lstrip().startswith("<?xml")


def test_plot_unknown_metric(runner: CliRunner, run: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.png"
    result = runner.invoke(app, ["plot", str(run), "-o", str(out), "--metric", "nope"])
    assert result.exit_code == 1
    assert result.stderr == (f"error: {run}: no metric 'nope' in the run; metrics: val_loss, acc\n")
    assert not out.exists()


def test_plot_of_a_run_without_metrics(runner: CliRunner, tmp_path: Path) -> None:
    with tk.CheckpointManager(tmp_path / "r") as mgr:
        mgr.save(1, {"x": torch.zeros(2)})
    result = runner.invoke(app, ["plot", str(tmp_path / "r"), "-o", str(tmp_path / "c.png")])
    assert result.exit_code == 1
    assert "the run has no metrics to plot" in result.stderr


def test_plot_to_a_missing_directory(runner: CliRunner, run: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["plot", str(run), "-o", str(tmp_path / "no" / "c.png")])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: cannot write ")


def test_plot_without_matplotlib(
    runner: CliRunner, run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    result = runner.invoke(app, ["plot", str(run), "-o", str(tmp_path / "c.png")])
    assert result.exit_code == 1
    assert "pip install 'torchkeep[plot]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_metric_history() -> None:
    history: list[dict[str, Any]] = [
        {"step": 1, "time": 0.0, "metrics": {"loss": 1.0}},
        {"step": 2, "time": 0.0, "metrics": {"loss": None, "acc": 0.5}},
        {"step": 3, "time": 0.0, "metrics": {"loss": 0.5}},
        {"step": 2, "time": 0.0, "metrics": {"loss": 0.7}},  # resumed from step 1: step 2 again
        {"step": "bad", "metrics": {"loss": 9.0}},
    ]
    curves = metric_history(history)
    assert list(curves) == ["loss", "acc"]
    assert curves["loss"] == {1: 1.0, 2: 0.7, 3: 0.5}
    assert curves["acc"] == {2: 0.5}
    assert math.isnan(metric_history([{"step": 0, "metrics": {"x": "text"}}])["x"][0])


def test_ls_on_a_folder_of_runs_lists_the_runs(runner: CliRunner, tmp_path: Path) -> None:
    folder = tmp_path / "runs"
    make_run(folder / "exp1", monitor="val_loss", mode="min")
    make_run(folder / "exp2", steps=[1, 2])
    (folder / "notes").mkdir()  # not a run: left out
    result = runner.invoke(app, ["ls", str(folder)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.startswith(f"2 run(s) in {folder}\n")
    assert re.search(rf"^exp1 +6 +{LATEST} +{BEST} \(val_loss=0\.3\) +\S+ KiB$", out, re.M), out
    assert re.search(r"^exp2 +2 +2 +- +\S+ KiB$", out, re.M), out
    assert "notes" not in out
    data = json.loads(runner.invoke(app, ["ls", "--json", str(folder)]).stdout)
    assert [(r["name"], r["checkpoints"], r["latest"], r["best"]) for r in data["runs"]] == [
        ("exp1", 6, LATEST, BEST),
        ("exp2", 2, 2, None),
    ]
    assert all(r["disk_bytes"] > 0 for r in data["runs"])
    empty = runner.invoke(app, ["ls", str(folder / "notes")])  # no run inside: still an error
    assert empty.exit_code == 1
    assert empty.stderr.startswith("CheckpointNotFoundError: ")
