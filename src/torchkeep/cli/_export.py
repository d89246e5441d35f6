"""``torchkeep export``: write a saved model as ONNX, ``.pt2`` or TorchScript, verified.

The command builds example inputs from ``--example-shape``/``--dtype`` (random values from a
fixed seed), calls :func:`torchkeep.export`, and prints what it wrote and how closely the file
computes what the model computes. A verification failure prints the same numbers, writes
nothing and exits with 1.

The flags' parsing and the example inputs are in :mod:`torchkeep.cli._export_inputs`.
"""

from __future__ import annotations

import contextlib
import enum
import os
import re
import sys
from collections.abc import Iterator
from typing import Annotated, Any

import typer

import torchkeep as tk
from torchkeep.cli._errors import fail, handle_errors, report_error
from torchkeep.cli._export_inputs import _dtypes, example_inputs, parse_dynamic_dims, parse_shape
from torchkeep.cli._output import (
    Column,
    emit_json,
    format_shape,
    human_bytes,
    print_kv,
    print_line,
    print_table,
    stderr_console,
)

__all__ = [
    "register",
    "render_report",
]


class Format(enum.StrEnum):
    """The artifact formats of ``--format``."""

    onnx = "onnx"
    pt2 = "pt2"
    torchscript = "torchscript"


class Method(enum.StrEnum):
    """How TorchScript captures the model (``--method``)."""

    script = "script"
    trace = "trace"


def register(app: typer.Typer) -> None:
    """Add ``export`` to the ``torchkeep`` app."""
    app.command("export")(export_command)


# ---------------------------------------------------------------------------------------------
# output


def _dynamic_text(dynamic: dict[int, str]) -> str | None:
    return ", ".join(f"{d}: {name}" for d, name in sorted(dynamic.items())) or None


def _verdict(check: tk.OutputCheck) -> str:
    if check.ok:
        return "ok"
    return f"MISMATCH on {check.case}" + (f": {check.problem}" if check.problem else "")


def _error(value: float) -> str:
    return f"{value:.3g}"


def render_report(report: tk.ExportReport, *, written: bool = True) -> None:
    """Print the heading, the inputs and outputs tables, the cases, the latency and the notes."""
    verdict = "verified" if report.ok else f"MISMATCH in {len(report.failures())} check(s)"
    state = "" if written else ", nothing written"
    size = human_bytes(report.size_bytes)
    if len(report.files) > 1:
        size += f" in {len(report.files)} files"
    pairs: list[tuple[str, object]] = [
        ("path", report.path),
        ("format", report.format),
        ("size", size),
        ("source", report.source),
        ("runtime", report.runtime),
    ]
    if report.opset is not None:
        pairs.append(("opset", report.opset))
    print_kv(pairs, title=f"{report.path}: {verdict}{state}")
    if len(report.files) > 1:
        print_kv([("files", ", ".join(report.files))])
    print_line()
    print_table(
        ["input", "shape", "dtype", "dynamic dims"],
        [[s.name, format_shape(s.shape), s.dtype, _dynamic_text(s.dynamic)] for s in report.inputs],
        title="inputs",
    )
    print_line()
    example = report.cases[0] if report.cases else None
    first = {c.output: c for c in report.checks if c.case == example}
    rel = report.max_rel_error
    rows: list[list[object]] = []
    for c in report.worst():
        shown = first.get(c.output, c)
        rows.append(
            [
                c.output,
                format_shape(shown.shape),
                shown.dtype or None,
                _error(c.max_abs_error),
                _error(rel.get(c.output, c.max_rel_error)),
                f"{c.rtol:g}",
                f"{c.atol:g}",
                _verdict(c),
            ]
        )
    print_table(
        [
            "output",
            "shape",
            "dtype",
            Column("max abs error", "right"),
            Column("max rel error", "right"),
            Column("rtol", "right"),
            Column("atol", "right"),
            "verdict",
        ],
        rows,
        title="outputs (worst case of each)",
    )
    print_line()
    latency = (
        f"eager {report.eager_latency_ms:.3f} ms, exported {report.exported_latency_ms:.3f} ms"
    )
    speedup = report.speedup
    if speedup > 0:
        latency += f" ({speedup:.2f}x faster)" if speedup >= 1 else f" ({1 / speedup:.2f}x slower)"
    latency += f", median of {report.latency_runs}"
    print_kv([("cases", ", ".join(report.cases)), ("latency", latency)])
    for note in report.notes:
        print_line(f"note: {note}")


#: The API's words in hints -> this command's flags.
_FLAGS = (
    (re.compile(r"format='(\w+)'"), r"--format \1"),
    (re.compile(r"method='(\w+)'"), r"--method \1"),
    (re.compile(r"dynamic_batch=False"), "--static-batch"),
    (re.compile(r"\bdynamic_dims\b"), "--dynamic-dim"),
    (re.compile(r"\brtol/atol\b"), "--rtol/--atol"),
    (re.compile(r"\bopset=(\w+)"), r"--opset \1"),
    (re.compile(r"\btrust=True\b"), "--trust"),
    (re.compile(r"\ballow_import='([\w.]+)'"), r"--allow-import \1"),
    (re.compile(r", pass the class \(model_class=\w+\), or import the module before loading"), ""),
    (re.compile(r"\bbatch_sizes=\[\]"), "--static-batch"),
)


def _as_flags(hint: str | None) -> str | None:
    """A hint of :func:`torchkeep.export` in the words of the command line."""
    if hint is None:
        return None
    for pattern, flag in _FLAGS:
        hint = pattern.sub(flag, hint)
    return hint


@contextlib.contextmanager
def _spinner(text: str, enabled: bool) -> Iterator[None]:
    """A status spinner on stderr while exporting, only when stderr is a terminal."""
    console = stderr_console()
    if not enabled or not console.is_terminal:
        yield
        return
    with console.status(text):
        yield


# ---------------------------------------------------------------------------------------------
# the command


@handle_errors
def export_command(
    src: Annotated[
        str,
        typer.Argument(
            metavar="SRC",
            help="A save_model directory or a checkpoint reference (RUN@best|latest|<step>).",
            show_default=False,
        ),
    ],
    output: Annotated[
        str,
        typer.Option(
            "--output",
            "-o",
            metavar="OUT",
            help="The file to write: .onnx, .pt2, or .pt (TorchScript).",
            show_default=False,
        ),
    ],
    example_shape: Annotated[
        list[str] | None,
        typer.Option(
            "--example-shape",
            metavar="SHAPE",
            help="The shape of one positional input, e.g. 2,3,224,224; repeat it per input, "
            "in forward's order.",
            show_default=False,
        ),
    ] = None,
    example_file: Annotated[
        str | None,
        typer.Option(
            "--example-inputs",
            metavar="FILE",
            help="Real example inputs instead of random ones: a file of tensors that "
            "torchkeep.load reads (e.g. saved with tk.save({'input_ids': ..., ...})), passed "
            "to forward by name (a dict) or in order (a list or tuple).",
            show_default=False,
        ),
    ] = None,
    dtype: Annotated[
        list[str] | None,
        typer.Option(
            "--dtype",
            metavar="DTYPE",
            help="The dtype of the inputs (default float32): once for all of them, or once per "
            "--example-shape. Floating inputs are random normal values; integer and bool "
            "inputs are 0s and 1s, valid token ids and attention masks.",
            show_default=False,
        ),
    ] = None,
    fmt: Annotated[
        Format | None,
        typer.Option(
            "--format",
            help="The artifact format (default: from OUT's suffix).",
            show_default=False,
        ),
    ] = None,
    dynamic_dim: Annotated[
        list[str] | None,
        typer.Option(
            "--dynamic-dim",
            metavar="INPUT:DIM:NAME",
            help="Leave dimension DIM of INPUT (its position or name) dynamic as NAME, e.g. "
            "0:1:seq; one NAME used twice is one shared size. Repeatable.",
            show_default=False,
        ),
    ] = None,
    static_batch: Annotated[
        bool,
        typer.Option("--static-batch", help="Keep the batch dimension fixed (default: dynamic)."),
    ] = False,
    opset: Annotated[
        int | None, typer.Option("--opset", min=1, help="The ONNX opset (default: the exporter's).")
    ] = None,
    method: Annotated[
        Method,
        typer.Option("--method", help="TorchScript: script keeps control flow; trace does not."),
    ] = Method.script,
    rtol: Annotated[
        float | None,
        typer.Option(
            "--rtol",
            min=0.0,
            help="Relative tolerance of floating outputs (default: torch.testing's for the dtype).",
        ),
    ] = None,
    atol: Annotated[
        float | None,
        typer.Option(
            "--atol",
            min=0.0,
            help="Absolute tolerance of floating outputs (default: torch.testing's for the dtype).",
        ),
    ] = None,
    external_data: Annotated[
        bool | None,
        typer.Option(
            "--external-data/--no-external-data",
            help="ONNX: weights in OUT.data beside the model, or inline (default: by size).",
            show_default=False,
        ),
    ] = None,
    trust: Annotated[
        bool,
        typer.Option(
            "--trust", help="Allow a pickled model file as SRC: loading it runs code from it."
        ),
    ] = False,
    allow_import: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-import",
            metavar="MODULE",
            help="Let SRC's recorded model class be imported from MODULE (or a package "
            "prefix); repeatable. Importing a module runs its code.",
        ),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON for programs.")] = False,
) -> None:
    """Export a saved model to ONNX, torch.export (.pt2) or TorchScript, and verify it.

    A saved model's class is imported from the installed packages or the working directory,
    and only from a module given with --allow-import: importing a module runs its code.

    The file is loaded back and run on the example inputs and other batch sizes; each output
    is compared with the model's. Only a verified file is written: on a mismatch nothing is
    written, the numbers are printed and the exit code is 1.
    """
    # Like `python -m`, find the model's class in the working directory too (appended, so that
    # it cannot shadow an installed package): a console script's sys.path does not hold it.
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    if (example_file is None) == (not example_shape):
        fail("give either --example-shape (random inputs) or --example-inputs FILE", code=2)
    inputs: Any
    if example_file is not None:
        if dtype:
            fail("--dtype applies to --example-shape; --example-inputs keeps the file's", code=2)
        inputs = tk.load(example_file)
    else:
        shapes = [parse_shape(s) for s in example_shape or []]
        inputs = example_inputs(shapes, _dtypes(dtype or [], len(shapes)))
    dims = parse_dynamic_dims(dynamic_dim or [])
    target = fmt.value if fmt is not None else output
    try:
        with _spinner(f"exporting to {target}…", enabled=not json_out):
            report = tk.export(
                src,
                inputs,
                output,
                format=None if fmt is None else fmt.value,
                dynamic_batch=not static_batch,
                dynamic_dims=dims or None,
                opset=opset,
                external_data=external_data,
                method=method.value,
                rtol=rtol,
                atol=atol,
                trust=trust,
                allow_import=allow_import or None,
            )
    except tk.TorchkeepError as err:
        err.hint = _as_flags(err.hint)
        if not isinstance(err, tk.ExportVerificationError) or err.report is None:
            raise
        if json_out:
            emit_json(err.report.to_dict())
        else:
            render_report(err.report, written=False)
        report_error(err, json_document=False)  # the report is the JSON document
        raise typer.Exit(1) from None
    if json_out:
        emit_json(report.to_dict())
    else:
        render_report(report)
