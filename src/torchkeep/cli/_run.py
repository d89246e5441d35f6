"""``torchkeep ls | prune``: the checkpoints of a run and its retention.

``ls`` opens the run read-only (``CheckpointManager(run, read_only=True)``): they
take no lock and write nothing, so they work while a training process is writing to the run.
``prune`` takes the writer lock; a running writer makes it fail with ``RunLockedError``, except
with ``--dry-run``, which only reads.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Sequence
from typing import Annotated, Any, TypedDict

import typer

import torchkeep as tk
from torchkeep.cli._errors import handle_errors
from torchkeep.cli._output import (
    Column,
    compact_json,
    emit_json,
    human_bytes,
    print_kv,
    print_line,
    print_table,
)
from torchkeep.storage import is_url, local_path, remote_tree_bytes

__all__ = [
    "RUN_ARGUMENT",
    "disk_bytes",
    "ls_command",
    "metric_names",
    "prune_command",
    "register",
    "render_run",
    "run_name",
    "runs_in",
]


class RetentionRules(TypedDict):
    """The rules of ``torchkeep prune``, as ``CheckpointManager.prune`` takes them."""

    keep_last: int | None
    keep_best: int | None
    keep_every: int | None


def register(app: typer.Typer) -> None:
    """Add ``ls`` and ``prune`` to the ``torchkeep`` app."""
    app.command("ls")(ls_command)
    app.command("prune")(prune_command)


RUN_ARGUMENT = typer.Argument(
    metavar="RUN",
    help="A run directory (written by torchkeep.CheckpointManager).",
    show_default=False,
)


# ---------------------------------------------------------------------------------------------
# helpers


def disk_bytes(root: str | os.PathLike[str]) -> int:
    """Bytes of every file under ``root`` (apparent sizes, as ``du --apparent-size``)."""
    if is_url(root):
        return remote_tree_bytes(root)
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                total += os.stat(os.path.join(folder, name)).st_size
            except FileNotFoundError:  # deleted by a writer meanwhile
                continue
    return total


def run_name(root: str | os.PathLike[str]) -> str:
    return local_path(root).resolve().name or str(root)


def _local_time(seconds: float) -> str:
    return _dt.datetime.fromtimestamp(seconds).isoformat(timespec="seconds")


def _metric_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float):
        return f"{value:.6g}"
    return compact_json(value)


def _policy_text(policy: tk.RetentionPolicy) -> str:
    rules = [
        f"{name}={value}"
        for name in ("keep_last", "keep_best", "keep_every")
        if (value := getattr(policy, name)) is not None
    ]
    text = ", ".join(rules) if rules else "keep everything (no retention rule)"
    if policy.monitor:
        text += f"; best = {policy.mode} {policy.monitor}"
    return text


def metric_names(records: Sequence[dict[str, Any]]) -> list[str]:
    """The metric names of ``records`` (dicts with a ``metrics`` dict), in first-seen order."""
    names: dict[str, None] = {}
    for record in records:
        metrics = record.get("metrics")
        if isinstance(metrics, dict):
            names.update(dict.fromkeys(metrics))
    return list(names)


def _marks(records: Sequence[tk.CheckpointRecord]) -> dict[int, str]:
    marks: dict[int, list[str]] = {}
    if records:
        marks.setdefault(records[-1].step, []).append("latest")
    for record in records:
        if "best" in record.kept:
            marks.setdefault(record.step, []).append("best")
    return {step: ",".join(m) for step, m in marks.items()}


# ---------------------------------------------------------------------------------------------
# ls


def render_run(mgr: tk.CheckpointManager) -> None:
    """Print the checkpoints of a run as a table, then its policy and totals.

    Args:
        mgr: a manager opened on the run (read-only is enough).
    """
    records = mgr.checkpoints
    marks = _marks(records)
    names = metric_names([{"metrics": r.metrics} for r in records])
    if records:
        print_table(
            [
                Column("step", justify="right"),
                Column("mark"),
                Column("time"),
                *(Column(name, justify="right") for name in names),
                Column("size", justify="right"),
                Column("kept because"),
            ],
            [
                (
                    r.step,
                    marks.get(r.step),
                    _local_time(r.time),
                    *(_metric_text(r.metrics.get(name)) for name in names),
                    human_bytes(r.size),
                    ",".join(r.kept),
                )
                for r in records
            ],
        )
    else:
        print_line("no checkpoints yet")
    on_disk = disk_bytes(mgr.root)
    print_line()
    print_kv(
        [
            ("run", run_name(mgr.root)),
            ("policy", _policy_text(mgr.policy)),
            ("checkpoints", f"{len(records)} ({len(mgr.history)} saved in all)"),
            ("on disk", f"{human_bytes(on_disk)} ({on_disk:,} bytes)"),
        ]
    )


def runs_in(folder: str | os.PathLike[str]) -> list[tk.CheckpointManager]:
    """The runs directly inside ``folder``, opened read-only, by name.

    Returns an empty list when ``folder`` is no directory or holds no run. Each manager must be
    closed by the caller.
    """
    root = local_path(folder)  # a URL's RemotePath lists its store
    if not root.is_dir():
        return []
    found = []
    for child in sorted(root.iterdir()):
        if child.name.startswith(".") or not child.is_dir():
            continue
        try:
            found.append(tk.CheckpointManager(child, read_only=True))
        except tk.CheckpointNotFoundError:
            continue  # not a run
    return found


def _run_summary(mgr: tk.CheckpointManager) -> dict[str, Any]:
    records = mgr.checkpoints
    best = next((r for r in records if "best" in r.kept), None)
    return {
        "run": str(mgr.root),
        "name": mgr.root.name,
        "checkpoints": len(records),
        "latest": records[-1].step if records else None,
        "best": best.step if best else None,
        "monitor": mgr.policy.monitor,
        "best_value": best.metrics.get(mgr.policy.monitor) if best and mgr.policy.monitor else None,
        "disk_bytes": disk_bytes(mgr.root),
    }


def _list_runs(folder: str, runs: list[tk.CheckpointManager], *, as_json: bool) -> None:
    try:
        summaries = [_run_summary(mgr) for mgr in runs]
    finally:
        for mgr in runs:
            mgr.close()
    if as_json:
        emit_json({"folder": folder, "runs": summaries})
        return
    print_table(
        [
            Column("run"),
            Column("checkpoints", justify="right"),
            Column("latest", justify="right"),
            Column("best", justify="right"),
            Column("size", justify="right"),
        ],
        [
            (
                s["name"],
                s["checkpoints"],
                s["latest"],
                None
                if s["best"] is None
                else f"{s['best']} ({s['monitor']}={_metric_text(s['best_value'])})",
                human_bytes(s["disk_bytes"]),
            )
            for s in summaries
        ],
        title=f"{len(summaries)} run(s) in {folder}",
    )
    print_line()
    first = local_path(folder) / summaries[0]["name"]
    print_line(f"torchkeep ls {first} lists a run's checkpoints")


@handle_errors
def ls_command(
    run: Annotated[
        str,
        typer.Argument(
            metavar="RUN",
            help="A run directory (written by torchkeep.CheckpointManager), or a folder of runs.",
            show_default=False,
        ),
    ],
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help=(
                "Print the run, its policy and its checkpoints (CheckpointRecord.to_dict()) "
                "as JSON, and nothing else."
            ),
        ),
    ] = False,
) -> None:
    """List the checkpoints of a run: step, time, metrics, size and why each is kept.

    Marks the latest and the best checkpoint (by the run's monitored metric). Given a folder
    of runs instead, lists the runs in it: checkpoints, latest and best step, size. Opens runs
    read-only: never takes the writer lock, so it works while training writes to the run.
    """
    try:
        mgr = tk.CheckpointManager(run, read_only=True)
    except tk.CheckpointNotFoundError:
        runs = runs_in(run)
        if not runs:
            raise
        _list_runs(run, runs, as_json=as_json)
        return
    with mgr:
        if not as_json:
            render_run(mgr)
            return
        records = mgr.checkpoints
        marks = _marks(records)
        emit_json(
            {
                "run": str(mgr.root),
                "policy": mgr.policy.to_dict(),
                "checkpoints": [r.to_dict() for r in records],
                "latest": next((s for s, m in marks.items() if "latest" in m), None),
                "best": next((s for s, m in marks.items() if "best" in m), None),
                "disk_bytes": disk_bytes(mgr.root),
            }
        )


# ---------------------------------------------------------------------------------------------
# prune


def _steps_text(steps: Sequence[int]) -> str:
    return ", ".join(map(str, steps)) if steps else "none"


@handle_errors
def prune_command(
    ctx: typer.Context,
    run: Annotated[str, RUN_ARGUMENT],
    keep_last: Annotated[
        int | None,
        typer.Option("--keep-last", min=1, metavar="N", help="Keep the N most recent checkpoints."),
    ] = None,
    keep_best: Annotated[
        int | None,
        typer.Option(
            "--keep-best",
            min=1,
            metavar="K",
            help="Keep the K best by the run's monitored metric.",
        ),
    ] = None,
    keep_every: Annotated[
        int | None,
        typer.Option(
            "--keep-every",
            min=1,
            metavar="E",
            help="Keep every checkpoint whose step is a multiple of E.",
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Only show what would be deleted; reads the run without locking it.",
        ),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the outcome as JSON, and nothing else.")
    ] = False,
) -> None:
    """Delete the checkpoints of a run that these rules do not keep.

    The rules combine as a union; the latest and the best checkpoint always stay. The run's
    stored policy is not changed. Takes the run's writer lock: fails with RunLockedError while
    a training process writes to the run.
    """
    if keep_last is None and keep_best is None and keep_every is None:
        ctx.fail("give at least one rule: --keep-last, --keep-best or --keep-every")
    rules = RetentionRules(keep_last=keep_last, keep_best=keep_best, keep_every=keep_every)
    # Read-only first: a writer would create a run at a mistyped path.
    with tk.CheckpointManager(run, read_only=True) as reader:
        records = reader.checkpoints
        plan = reader.prune(**rules, dry_run=True)
    before = disk_bytes(run)
    if not dry_run:
        with tk.CheckpointManager(run) as mgr:
            records = mgr.checkpoints  # the writer's view, after it swept a crashed save
            plan = mgr.prune(**rules, dry_run=True)
            mgr.prune(**rules)  # under the same lock: deletes exactly plan.delete
    deleted, kept = plan.delete, plan.keep
    after = before if dry_run else disk_bytes(run)
    stay = [r.step for r in records if r.step not in deleted]
    if as_json:
        emit_json(
            {
                "run": str(local_path(run)),
                "dry_run": dry_run,
                "rules": plan.policy.to_dict(),
                "deleted": deleted,
                "kept": [{"step": s, "kept": list(kept.get(s, ()))} for s in stay],
                "disk_bytes_before": before,
                "disk_bytes_after": after,
            }
        )
        return
    action = "would delete" if dry_run else "deleted"
    print_table(
        [Column("step", justify="right"), Column("action"), Column("kept because")],
        [
            (r.step, action if r.step in deleted else "keep", ",".join(kept.get(r.step, ())))
            for r in records
        ],
        title=f"rules: {_policy_text(plan.policy)}",
    )
    print_line()
    print_line(f"{action} {len(deleted)} checkpoint(s): {_steps_text(deleted)}")
    print_line(f"kept {len(stay)} checkpoint(s): {_steps_text(stay)}")
    if dry_run:
        print_line("dry run: nothing was deleted")
    else:
        print_line(f"on disk: {human_bytes(before)} -> {human_bytes(after)}")
