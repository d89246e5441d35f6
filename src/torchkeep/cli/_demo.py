"""``torchkeep demo``: the whole workflow on synthetic data, on the CPU, in a few seconds.

The demo is a list of steps (:data:`STEPS`), each a function of the shared ``DemoRun``
(``_demo_common``), so that later features (checkpoint manager, resume, export) are one more
step each. A step reads what earlier steps left on the run and adds its own results. The
checkpoint-run steps live in ``_demo_resume``; the model, data and epoch in ``_demo_model``.
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import torchkeep as tk
from torchkeep.cli._demo_common import EXPORT_ONNX, EXPORT_PT2, DemoRun
from torchkeep.cli._demo_model import DemoMLP, make_data, predict, train_epoch
from torchkeep.cli._demo_registry import step_registry
from torchkeep.cli._demo_resume import (
    step_compare,
    step_ls,
    step_plot,
    step_resume,
    step_stop,
)
from torchkeep.cli._errors import fail, handle_errors
from torchkeep.cli._export import render_report
from torchkeep.cli._inspect import render_info
from torchkeep.cli._output import (
    Column,
    human_bytes,
    is_terminal,
    print_heading,
    print_kv,
    print_line,
    print_table,
    stdout_console,
)
from torchkeep.format import version_block

__all__ = ["STEPS", "demo_command", "register"]


def register(app: typer.Typer) -> None:
    """Add ``demo`` to the ``torchkeep`` app."""
    app.command("demo")(demo_command)


def _disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


# ---------------------------------------------------------------------------------------------
# steps


def step_data(run: DemoRun) -> None:
    """Make a seeded synthetic classification dataset."""
    run.data = make_data(run.seed)
    d = run.data
    print_kv(
        [
            ("train samples", len(d.x_train)),
            ("validation samples", len(d.x_val)),
            ("features", d.in_features),
            ("classes", d.num_classes),
        ]
    )


def _epoch(run: DemoRun, on_batch: Callable[[], None] | None = None) -> tuple[float, float, float]:
    # This run shuffles with a generator seeded per epoch; the managed runs of _demo_resume draw
    # the order from torch's global generator instead, which their RNGState restores.
    gen = torch.Generator().manual_seed(run.seed + len(run.train_losses))
    batch = int(run.hparams["batch_size"])
    return train_epoch(run.model, run.optimizer, run.data, batch, generator=gen, on_batch=on_batch)


def step_train(run: DemoRun) -> None:
    """Train the MLP with Adam, validating after every epoch."""
    h = run.hparams
    # Seeds the global RNG too: weight initialisation and dropout masks draw from it.
    torch.manual_seed(run.seed)
    run.model = DemoMLP(
        in_features=run.data.in_features,
        hidden=int(h["hidden"]),
        out_features=run.data.num_classes,
        dropout=float(h["dropout"]),
    )
    run.optimizer = torch.optim.Adam(run.model.parameters(), lr=float(h["lr"]))
    batches = -(-len(run.data.x_train) // int(h["batch_size"]))

    def line(epoch: int, tr: float, va: float, acc: float) -> str:
        losses = f"train_loss {tr:.4f}  val_loss {va:.4f}  val_acc {acc:.3f}"
        return f"epoch {epoch}/{run.epochs}  {losses}"

    def record(tr: float, va: float, acc: float) -> None:
        run.train_losses.append(tr)
        run.val_losses.append(va)
        run.val_accuracy.append(acc)

    if not is_terminal():
        for epoch in range(1, run.epochs + 1):
            tr, va, acc = _epoch(run)
            record(tr, va, acc)
            print_line(line(epoch, tr, va, acc))
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=stdout_console()) as progress:
        task = progress.add_task("training", total=run.epochs * batches)
        for epoch in range(1, run.epochs + 1):
            progress.update(task, description=f"epoch {epoch}/{run.epochs}")
            tr, va, acc = _epoch(run, lambda: progress.advance(task))
            record(tr, va, acc)
            progress.console.print(line(epoch, tr, va, acc), markup=False)


def step_save(run: DemoRun) -> None:
    """Save a tutorial-style checkpoint dict with tk.save, and the model with tk.save_model."""
    # A previous demo's outputs in the same --workdir are overwritten, atomically, by the API.
    checkpoint = {
        "epoch": run.epochs,
        "model_state_dict": run.model.state_dict(),
        "optimizer_state_dict": run.optimizer.state_dict(),
        "loss": run.train_losses[-1],
        "val_loss": run.val_losses[-1],
        "val_accuracy": run.val_accuracy[-1],
    }
    metadata = {
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        **version_block(with_format=False),  # who wrote it, with what (informational)
        "hyperparameters": run.hparams,
        "train_losses": run.train_losses,
        "val_losses": run.val_losses,
    }
    tk.save(checkpoint, run.checkpoint, metadata=metadata)
    tk.save_model(run.model, run.model_dir, config=run.model.config)
    print_kv(
        [
            ("tk.save", f"{run.checkpoint} ({human_bytes(_disk_bytes(run.checkpoint))})"),
            ("tk.save_model", f"{run.model_dir} ({human_bytes(_disk_bytes(run.model_dir))})"),
        ]
    )


def step_load_into(run: DemoRun) -> None:
    """Load the checkpoint into a freshly built model and compare predictions."""
    torch.manual_seed(run.seed + 1)  # a different initialisation than the trained model
    fresh = DemoMLP(**run.model.config)
    expected = predict(run.model, run.data.x_val)
    differs_before = not torch.equal(predict(fresh, run.data.x_val), expected)
    report = tk.load_into(fresh, run.checkpoint)
    print_kv(
        [
            ("source", report.source),
            ("entry", report.entry or "(the whole file)"),
            ("loaded", len(report.loaded)),
            ("missing", len(report.missing)),
            ("unexpected", len(report.unexpected)),
            ("mismatched", len(report.mismatched)),
        ],
        title="LoadReport",
    )
    if not report.ok:
        print_line(report.table())
    run.identical["load_into"] = torch.equal(predict(fresh, run.data.x_val), expected)
    print_line()
    print_line(f"fresh model differed before loading: {_yes(differs_before)}")
    print_line(f"predictions identical after tk.load_into: {_yes(run.identical['load_into'])}")


def step_load_model(run: DemoRun) -> None:
    """Rebuild the model from its directory with tk.load_model and compare predictions."""
    model = tk.load_model(run.model_dir)
    expected = predict(run.model, run.data.x_val)
    run.identical["load_model"] = torch.equal(predict(model, run.data.x_val), expected)
    print_line(f"rebuilt {type(model).__module__}.{type(model).__qualname__} (eval mode)")
    print_line(f"predictions identical after tk.load_model: {_yes(run.identical['load_model'])}")


def step_inspect(run: DemoRun) -> None:
    """Show what the checkpoint file holds, as `torchkeep inspect` does."""
    render_info(tk.inspect(run.checkpoint))


def step_export(run: DemoRun) -> None:
    """Export the run's best checkpoint for deployment, verified, and print the report."""
    has_onnx = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript"))
    path = run.workdir / (EXPORT_ONNX if has_onnx else EXPORT_PT2)
    source = f"{run.run_dir}@best" if run.run_dir.is_dir() else str(run.model_dir)
    shape = f"2,{run.data.x_val.shape[1]}"
    print_line(f"$ torchkeep export {source} --example-shape {shape} -o {path}")
    if not has_onnx:
        print_line("(the onnx extra is not installed: exporting to .pt2 instead)")
    run.exported = tk.export(source, run.data.x_val[:2].clone(), path)
    print_line()
    render_report(run.exported)


def step_summary(run: DemoRun) -> None:
    """Print the outcome in one table."""
    print_table(
        [Column("what"), Column("value")],
        [
            ("epochs", run.epochs),
            ("final train loss", f"{run.train_losses[-1]:.4f}"),
            ("final val loss", f"{run.val_losses[-1]:.4f}"),
            ("final val accuracy", f"{run.val_accuracy[-1]:.3f}"),
            ("checkpoint", f"{run.checkpoint} ({human_bytes(_disk_bytes(run.checkpoint))})"),
            ("model dir", f"{run.model_dir} ({human_bytes(_disk_bytes(run.model_dir))})"),
            *((f"predictions identical ({k})", _yes(v)) for k, v in run.identical.items()),
            *(
                [("checkpoint run", f"{run.run_dir} ({human_bytes(_disk_bytes(run.run_dir))})")]
                if run.run_dir.is_dir()
                else []
            ),
            *(
                [("resumed = uninterrupted, bit for bit", _yes(run.resumed_exactly))]
                if run.resumed_exactly is not None
                else []
            ),
            *(
                [
                    (
                        f"export ({run.exported.format})",
                        f"{run.exported.path} ({human_bytes(run.exported.size_bytes)}), "
                        f"verified on {len(run.exported.cases)} input cases",
                    )
                ]
                if run.exported is not None
                else []
            ),
            *(
                [("registry", f"{run.registered.reference} = production")]
                if run.registered is not None
                else []
            ),
            ("elapsed", f"{time.perf_counter() - run.started:.1f} s"),
        ],
    )


#: The demo, in order: (title, step). Later features add a step here.
STEPS: list[tuple[str, Callable[[DemoRun], None]]] = [
    ("Make a synthetic dataset", step_data),
    ("Train a small MLP", step_train),
    ("Save a checkpoint (tk.save) and the model (tk.save_model)", step_save),
    ("Load into a fresh model (tk.load_into)", step_load_into),
    ("Rebuild the model (tk.load_model)", step_load_model),
    ("Inspect the checkpoint (tk.inspect)", step_inspect),
    ("Train with tk.CheckpointManager in a new process, stopped early", step_stop),
    ("Resume the run in another new process", step_resume),
    ("Train without interruption and compare with the resumed run", step_compare),
    ("List the run (torchkeep ls)", step_ls),
    ("Plot the run's metrics (torchkeep plot)", step_plot),
    ("Export the best checkpoint for deployment (tk.export), verified", step_export),
    ("Register the best checkpoint, promote it to production (tk.Registry)", step_registry),
    ("Summary", step_summary),
]


@handle_errors
def demo_command(
    workdir: Annotated[
        Path | None,
        typer.Option(
            "--workdir",
            file_okay=False,
            dir_okay=True,
            show_default=False,
            help=(
                "Directory for the files the demo writes: checkpoint.safetensors, model/, "
                "the checkpoint runs run/ and run-uninterrupted/, curves.png, model.onnx and "
                "the registry models/ "
                "(created if missing; a previous demo's files are replaced). "
                "Default: a fresh temporary directory, printed."
            ),
        ),
    ] = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Training epochs.")] = 5,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the data and the model.")] = 0,
) -> None:
    """Train, checkpoint, reload, inspect, stop and resume a small model (CPU, seconds).

    Then trains it with a CheckpointManager in a new process that stops early, resumes it in
    another, compares with an uninterrupted run, lists the run, plots its metrics, and exports
    the best checkpoint to ONNX (.pt2 without the onnx extra), verified, and registers it as
    version 1 of a model in a registry, aliased "production". Exits with 1 when a
    reloaded model does not predict exactly what the trained one does, when the resumed run
    differs from the uninterrupted one, or when the export does not verify.
    """
    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="torchkeep-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    run = DemoRun(
        workdir=workdir.resolve(),
        epochs=epochs,
        seed=seed,
        hparams={"lr": 1e-2, "batch_size": 64, "hidden": 64, "dropout": 0.1, "epochs": epochs},
    )
    print_line(f"torchkeep {tk.__version__} demo, torch {torch.__version__}, CPU")
    print_line(f"workdir: {run.workdir}")
    # The tensors are tiny: extra threads only add synchronisation, which costs seconds on a
    # busy machine. Restored afterwards for callers that run the command in-process.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i, (title, step) in enumerate(STEPS, start=1):
            print_line()
            print_heading(f"Step {i}/{len(STEPS)}: {title}")
            step(run)
    finally:
        torch.set_num_threads(threads)

    identical = all(run.identical.values())
    print_line()
    print_line(f"predictions identical: {'yes' if identical else 'no'}")
    if not identical:
        failed = ", ".join(k for k, v in run.identical.items() if not v)
        fail(f"predictions differ after reloading with {failed}")
    if run.resumed_exactly is False:
        fail("the resumed run differs from the uninterrupted run")
