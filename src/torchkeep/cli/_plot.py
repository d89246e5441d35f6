"""``torchkeep plot``: the metric curves of a run, with its kept and best checkpoints.

matplotlib is an optional extra (``plot``): it is imported inside :func:`write_plot`, so that a
missing install is reported by :func:`~torchkeep.cli._errors.handle_errors` with the
``pip install 'torchkeep[plot]'`` line. The figure is drawn with the Agg canvas directly (no
pyplot, no global backend switch), so it works without a display and inside other programs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

import torchkeep as tk
from torchkeep.cli._errors import fail, handle_errors
from torchkeep.cli._output import print_line
from torchkeep.cli._run import RUN_ARGUMENT, metric_names, run_name

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["metric_history", "plot_command", "register", "write_plot"]


def register(app: typer.Typer) -> None:
    """Add ``plot`` to the ``torchkeep`` app."""
    app.command("plot")(plot_command)


def metric_history(history: Sequence[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """Per metric, ``step -> value`` over every save of a run (``CheckpointManager.history``).

    A step saved more than once (a run resumed from an earlier checkpoint) keeps its last
    value; values that are not numbers (``None`` for NaN) become NaN, plotted as a gap.
    """
    curves: dict[str, dict[int, float]] = {name: {} for name in metric_names(history)}
    for record in history:
        step, metrics = record.get("step"), record.get("metrics")
        if not isinstance(step, int) or not isinstance(metrics, dict):
            continue
        for name, value in metrics.items():
            number = isinstance(value, int | float) and not isinstance(value, bool)
            curves[name][step] = float(value) if number else math.nan
    return {name: dict(sorted(c.items())) for name, c in curves.items()}


def write_plot(
    mgr: tk.CheckpointManager, output: str | os.PathLike[str], metrics: Sequence[str] = ()
) -> Path:
    """Draw the metric curves of a run into an image file (PNG, SVG, PDF by its suffix).

    One subplot per metric, steps on x: the whole history as a line, the retained checkpoints
    as dots, the best checkpoint (by the run's monitored metric) as an annotated star.

    Args:
        mgr: a manager opened on the run (read-only is enough).
        output: the image file to write.
        metrics: the metrics to draw; default every numeric metric of the history.

    Returns:
        The path written.

    Raises:
        ImportError: matplotlib is not installed (the ``plot`` extra).
        typer.Exit: no history, an unknown metric, or the file cannot be written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    name = run_name(mgr.root)
    curves = metric_history(mgr.history)
    if not curves:
        fail(f"{mgr.root}: the run has no metrics to plot (save with metrics={{...}})")
    unknown = [m for m in metrics if m not in curves]
    if unknown:
        fail(f"{mgr.root}: no metric {unknown[0]!r} in the run; metrics: {', '.join(curves)}")
    chosen = list(dict.fromkeys(metrics)) or [
        m for m, c in curves.items() if any(not math.isnan(v) for v in c.values())
    ]
    if not chosen:
        fail(f"{mgr.root}: no metric of the run has a numeric value")
    records = mgr.checkpoints
    best = next((r for r in records if "best" in r.kept), None)

    fig = Figure(figsize=(8, 1.0 + 2.4 * len(chosen)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(chosen), 1, sharex=True, squeeze=False)[:, 0]
    stars: list[tuple[Axes, int, float, str]] = []
    for ax, metric in zip(axes, chosen, strict=True):
        curve = curves[metric]
        ax.plot(list(curve), list(curve.values()), color="tab:blue", lw=1.5, label="every save")
        kept = [(r.step, curve[r.step]) for r in records if r.step in curve]
        if kept:
            ax.plot(*zip(*kept, strict=True), "o", color="tab:blue", ms=6, label="kept checkpoint")
        if best is not None and not math.isnan(curve.get(best.step, math.nan)):
            value = curve[best.step]
            ax.axvline(best.step, color="tab:orange", ls=":", lw=1, alpha=0.7)
            ax.plot([best.step], [value], "*", color="tab:orange", ms=16, mec="black", label="best")
            stars.append(
                (
                    ax,
                    best.step,
                    value,
                    f"best ({mgr.policy.monitor}): step {best.step}\n{value:.4g}",
                )
            )
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
        ax.margins(y=0.2)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax, step, value, text in stars:  # once the limits are known, to keep labels inside
        _annotate(ax, step, value, text)
    axes[0].legend(loc="best", fontsize=8)
    axes[-1].set_xlabel("step")
    monitor = f", best by {mgr.policy.mode} {mgr.policy.monitor}" if mgr.policy.monitor else ""
    fig.suptitle(f"{name}: {len(records)} checkpoints kept{monitor}")

    path = Path(output)
    try:
        fig.savefig(path, dpi=110)
    except (OSError, ValueError) as err:
        fail(f"cannot write {path}: {err}")
    return path


def _annotate(ax: Axes, x: float, y: float, text: str) -> None:
    """Label a point, on the side of it that faces the middle of the axes."""
    x_lo, x_hi = ax.get_xlim()
    y_lo, y_hi = ax.get_ylim()
    right = x - x_lo > 0.6 * (x_hi - x_lo)
    upper = y - y_lo > 0.5 * (y_hi - y_lo)
    ax.annotate(
        text,
        (x, y),
        xytext=(-14 if right else 14, -10 if upper else 10),
        textcoords="offset points",
        ha="right" if right else "left",
        va="top" if upper else "bottom",
        fontsize=9,
        bbox={"boxstyle": "round", "fc": "white", "ec": "0.6", "alpha": 0.9},
    )


@handle_errors
def plot_command(
    run: Annotated[str, RUN_ARGUMENT],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            dir_okay=False,
            show_default=False,
            help="Image file to write; the format follows the suffix (.png, .svg, .pdf).",
        ),
    ],
    metric: Annotated[
        list[str] | None,
        typer.Option(
            "--metric",
            "-m",
            metavar="NAME",
            show_default=False,
            help="A metric to plot (repeat for several). Default: every metric of the run.",
        ),
    ] = None,
) -> None:
    """Plot the metrics of a run against the step: its history, kept checkpoints and the best.

    Needs matplotlib (the 'plot' extra of torchkeep). Opens the run read-only: works while
    training writes to the run.
    """
    with tk.CheckpointManager(run, read_only=True) as mgr:
        path = write_plot(mgr, output, metric or ())
    print_line(f"wrote {path}")
