"""``torchkeep.export``: write an artifact into staging, load it back, compare, then publish."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from torchkeep._export import _inputs, _onnx, _pt2, _torchscript
from torchkeep._export._compare import compare, flat_outputs, median_ms
from torchkeep._export._diagnose import diagnose
from torchkeep._export._eager import attention_slow_path, eval_mode
from torchkeep._export._inputs import Inputs
from torchkeep._export._load import ExportFormat, loader
from torchkeep._export._quiet import quiet
from torchkeep._export._report import ExportReport, OutputCheck
from torchkeep.errors import (
    ExportError,
    ExportVerificationError,
    InvalidArgumentError,
    TorchkeepError,
)
from torchkeep.io import load_model
from torchkeep.storage import local_path, storage_for
from torchkeep.storage._location import with_options

__all__ = ["FORMATS", "export"]

FORMATS: dict[str, ExportFormat] = {
    ".onnx": "onnx",
    ".pt2": "pt2",
    ".pt": "torchscript",
    ".ts": "torchscript",
    ".torchscript": "torchscript",
    ".jit": "torchscript",
}
_CAPTURE = "capturing the model with torch.export"


def _format(path: Path, fmt: str | None) -> ExportFormat:
    if fmt is None:
        found = FORMATS.get(path.suffix.lower())
        if found is None:
            raise InvalidArgumentError(
                f"cannot tell the export format from the suffix {path.suffix!r}",
                path=str(path),
                hint="name the file .onnx, .pt2 or .pt (TorchScript), or pass format=",
            )
        return found
    if fmt not in ("onnx", "pt2", "torchscript"):
        raise InvalidArgumentError(
            f"unknown export format {fmt!r}", hint="use 'onnx', 'pt2' or 'torchscript'"
        )
    return fmt  # type: ignore[return-value]  # one of the three: checked just above


def _resolve(
    model_or_ref: Any, trust: bool, allow_import: str | Iterable[str] | None = None
) -> tuple[nn.Module, str]:
    if isinstance(model_or_ref, nn.Module):
        return model_or_ref, type(model_or_ref).__qualname__
    if isinstance(model_or_ref, str | os.PathLike):
        # the layer below's single-artifact API: a save_model directory, RUN@best, a trusted file
        model = load_model(model_or_ref, trust=trust, allow_import=allow_import)
        return model, f"{os.fspath(model_or_ref)} ({type(model).__qualname__})"
    raise InvalidArgumentError(
        f"cannot export a {type(model_or_ref).__name__}",
        hint="pass an nn.Module, a save_model directory or a checkpoint reference (RUN@best)",
    )


def _run_eager(model: nn.Module, case: str, inputs: Inputs) -> list[tuple[str, Any]]:
    try:
        with torch.no_grad():
            return flat_outputs(model(*inputs.args, **inputs.kwargs))
    except Exception as exc:
        hint = (
            "fix the example inputs (shapes, dtypes, device) so that the model runs on them"
            if case.startswith("example")
            else "the model needs that size fixed: pass dynamic_batch=False (or drop the "
            "dimension from dynamic_dims)"
        )
        raise ExportError(
            f"the eager model fails on the {case} inputs: {type(exc).__name__}: {exc}",
            key=case,
            hint=hint,
        ) from exc


def _checks(
    case: str,
    expected: list[tuple[str, Any]],
    actual: Any,
    rtol: float | None,
    atol: float | None,
) -> list[OutputCheck]:
    got = [leaf for _, leaf in flat_outputs(actual)]
    if len(got) != len(expected):
        problem = f"the export returns {len(got)} output(s), the model {len(expected)}"
        return [
            OutputCheck(case, name, (), "", float("inf"), float("inf"), 0.0, 0.0, False, problem)
            for name, _ in expected
        ]
    return [
        compare(case, name, want, have, rtol, atol)
        for (name, want), have in zip(expected, got, strict=True)
    ]


def _build_torchscript(
    model: nn.Module, inputs: Inputs, target: Path, options: dict[str, Any], notes: list[str]
) -> list[Path]:
    method = options["method"]
    notes.append(_torchscript.DEPRECATION)
    for optimize in [True, False] if options["optimize"] else [False]:
        try:
            scripted = _torchscript.build(model, inputs, method=method, optimize=optimize)
        except Exception as exc:
            raise diagnose(exc, model, fmt="torchscript", during=f"torch.jit.{method}") from exc
        _torchscript.save(scripted, target)
        try:
            _torchscript.load(target)
        except Exception as exc:
            if not optimize:
                raise ExportError(
                    f"torch.jit.load cannot read the TorchScript file just saved: {exc}",
                    step="torch.jit.save",
                    hint="try method='trace' or method='script', or format='pt2'",
                ) from exc
            # optimize_for_inference folds weights into MKLDNN constants that torch.jit.load
            # cannot read back (a torch bug): keep the frozen graph, optimize after loading.
            notes.append(
                "torch.jit.optimize_for_inference produced a file torch.jit.load cannot read "
                "(MKLDNN constants): saved frozen, not optimized; call "
                "torch.jit.optimize_for_inference on the loaded module"
            )
            continue
        break
    return [target]


def _build(
    fmt: ExportFormat,
    model: nn.Module,
    inputs: Inputs,
    target: Path,
    names: list[str],
    dims: list[dict[int, str]],
    options: dict[str, Any],
    notes: list[str],
) -> tuple[list[Path], int | None]:
    """Write the artifact at ``target``; the files written and the ONNX opset."""
    if fmt == "torchscript":
        return _build_torchscript(model, inputs, target, options, notes), None
    try:
        program = _pt2.capture(model, inputs, _inputs.torch_dynamic_shapes(model, inputs, dims))
    except TorchkeepError:
        raise
    except Exception as exc:
        raise diagnose(exc, model, fmt=fmt, during=_CAPTURE) from exc
    static = _pt2.static_dims(program, names, dims)
    if static:
        raise ExportError(
            f"torch.export made dimensions static that were asked to be dynamic: "
            f"{'; '.join(static)}",
            step=_CAPTURE,
            hint="the model's code fixes those sizes; pass dynamic_batch=False (or drop them "
            "from dynamic_dims) to export them static",
        )
    if fmt == "pt2":
        torch.export.save(program, target)
        return [target], None
    try:
        files, opset, more = _onnx.write(
            program, inputs, target, opset=options["opset"], external_data=options["external_data"]
        )
    except TorchkeepError:
        raise
    except Exception as exc:
        raise diagnose(exc, model, fmt=fmt, during="the ONNX export") from exc
    notes.extend(more)
    _onnx.check_file(target)
    symbolic = _onnx.symbolic_inputs(target)
    if len(symbolic) == len(dims):
        lost = [
            f"{name} dim {d} ({label})"
            for name, wanted, got in zip(names, dims, symbolic, strict=True)
            for d, label in wanted.items()
            if not got.get(d, False)
        ]
        if lost:
            raise ExportError(
                f"the ONNX graph has static sizes for dynamic dimensions: {', '.join(lost)}",
                step="the ONNX export",
                hint="export with dynamic_batch=False to make that explicit, or use format='pt2'",
            )
    return files, opset


def export(
    model_or_ref: nn.Module | str | os.PathLike[str],
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    format: ExportFormat | None = None,
    dynamic_batch: bool = True,
    dynamic_dims: Mapping[str | int, Mapping[int, str]] | None = None,
    opset: int | None = None,
    external_data: bool | None = None,
    method: Literal["script", "trace"] = "script",
    optimize: bool = True,
    rtol: float | None = None,
    atol: float | None = None,
    batch_sizes: list[int] | None = None,
    latency_runs: int = 20,
    trust: bool = False,
    allow_import: str | Iterable[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> ExportReport:
    """Export a model for deployment and prove the file computes what the model computes.

    The model runs in eval mode (its modes are restored afterwards). The artifact is written to
    a staging directory, loaded back from there (ONNX Runtime for ONNX, ``torch.export.load``
    for ``.pt2``, ``torch.jit.load`` for TorchScript) and run on the example inputs and on
    other sizes of every dynamic dimension; each output is compared with the eager model's.
    Only a verified artifact is moved to ``path``; a previous file there is replaced
    atomically, and kept when anything fails.

    Args:
        model_or_ref: an ``nn.Module``, a :func:`save_model` directory, or a checkpoint
            reference whose run recorded the model's class (``"runs/exp1@best"``, rebuilt by
            :func:`load_model`; for another app entry, pass ``load_model(ref, key="ema")``).
        example_inputs: a tensor, a tuple of positional arguments, or a dict of keyword
            arguments of ``forward`` (nested tuples, lists and dicts of tensors are fine).
        path: where to write: ``.onnx`` (weights over 1.5 GiB go to ``.onnx.data`` beside it),
            ``.pt2``, or ``.pt`` for TorchScript.
        format: ``"onnx"``, ``"pt2"`` or ``"torchscript"``; by default from the suffix.
        dynamic_batch: leave dimension 0 of the batched inputs dynamic. An example batch of 1
            is tiled to 2 first: torch.export would otherwise fix the batch to 1.
        dynamic_dims: more dynamic dimensions, by input name or position:
            ``{"input_ids": {1: "seq"}}``. One name used twice is one shared size.
        opset: the ONNX opset (default: the exporter's); a different opset written is an error.
        external_data: ONNX weights in ``.onnx.data`` (True), inline (False), or by size (None).
        method: TorchScript by ``"script"`` (keeps control flow) or ``"trace"``.
        optimize: TorchScript: ``torch.jit.optimize_for_inference`` after freezing.
        rtol, atol: tolerances for floating-point outputs; by default those of
            ``torch.testing.assert_close`` for the output's dtype; integers compare exactly.
        batch_sizes: the batch sizes verified besides the example's (default: 1 and one more
            than the example's).
        latency_runs: timed runs behind each latency median.
        trust: allow a pickled model file as the source.
        allow_import: for a saved model or a checkpoint reference, the modules its recorded
            class may be imported from when not already imported (see :func:`load_model`).

    Returns:
        An :class:`ExportReport`: files, size, per-output errors, latencies, notes.

    Raises:
        InvalidArgumentError: an unknown ``format`` (or suffix), bad ``dynamic_dims``, a
            destination that is a directory, or a source that is not a model or reference.
        ExportVerificationError: an output differs beyond tolerance (``err.report`` has every
            number); nothing is written.
        ExportError: the exporter failed; the message names the step and the submodule, the
            hint the alternatives. Also for a missing ``onnx`` extra.
    """
    model_or_ref = with_options(model_or_ref, storage_options)
    path = with_options(path, storage_options)
    dest = local_path(path)
    fmt = _format(dest, format)
    if fmt == "onnx":
        _onnx.require()
    if dest.is_dir():
        raise InvalidArgumentError(
            "the destination is a directory", path=str(dest), hint="give a file name"
        )
    model, source = _resolve(model_or_ref, trust, allow_import)
    inputs = _inputs.normalize(example_inputs)
    notes: list[str] = []
    options = {
        "method": method,
        "optimize": optimize,
        "opset": opset,
        "external_data": external_data,
    }
    with eval_mode(model), attention_slow_path(model, notes):
        if dynamic_batch and _inputs.batch_size(inputs) == 1:
            inputs = _inputs.ensure_batch(inputs)
            notes.append("the example batch of 1 was tiled to 2: torch.export fixes a batch of 1")
        names = _inputs.input_names(model, inputs)
        dims = _inputs.dynamic_dims(inputs, names, dynamic_batch=dynamic_batch, user=dynamic_dims)
        if dynamic_batch and not any(_inputs.BATCH in d.values() for d in dims):
            notes.append("no input has a batch dimension: nothing was made dynamic for it")
        cases = _inputs.cases(inputs, dims, batch_sizes)
        expected = [_run_eager(model, label, case) for label, case in cases]
        constants = [f"{n} = {v!r}" for n, v in expected[0] if not isinstance(v, torch.Tensor)]
        if fmt == "onnx" and constants:
            raise ExportError(
                f"an ONNX graph returns only tensors, and {type(model).__name__}.forward also "
                f"returns {', '.join(constants)}",
                step="the ONNX export",
                hint="return only tensors from forward (drop the value or wrap it in "
                "torch.tensor), or export with format='pt2', which returns it as it is",
            )

        def eager() -> Any:
            with torch.no_grad():
                return model(*inputs.args, **inputs.kwargs)

        eager_ms, runs = median_ms(eager, latency_runs)
        store = storage_for(dest)
        with store.staging_directory(str(dest)) as staged:
            target = Path(staged) / dest.name
            with quiet(notes):
                files, opset_written = _build(
                    fmt, model, inputs, target, names, dims, options, notes
                )
                runner, runtime = loader(fmt, target)
                checks = []
                for (label, case), want in zip(cases, expected, strict=True):
                    try:
                        got = runner(*case.args, **case.kwargs)
                    except Exception as exc:
                        raise ExportError(
                            f"the exported {fmt} artifact fails on the {label} inputs: "
                            f"{type(exc).__name__}: {exc}",
                            key=label,
                            hint="the export fixed a size the model accepts; pass "
                            "dynamic_batch=False or batch_sizes=[] to export it static",
                        ) from exc
                    checks += _checks(label, want, got, rtol, atol)
                exported_ms, _ = median_ms(
                    lambda: runner(*inputs.args, **inputs.kwargs), latency_runs
                )
            verified = all(c.ok for c in checks)
            report = ExportReport(
                path=str(dest),
                format=fmt,
                files=[str(dest.parent / f.name) for f in files] if verified else [],
                size_bytes=sum(storage_for(f).size(str(f)) for f in files),
                source=source,
                inputs=_inputs.specs(inputs, names, dims),
                outputs=[name for name, _ in expected[0]],
                checks=checks,
                eager_latency_ms=eager_ms,
                exported_latency_ms=exported_ms,
                latency_runs=runs,
                runtime=runtime,
                opset=opset_written,
                notes=notes,
            )
            if not report.ok:
                raise ExportVerificationError(
                    "the exported model computes something else than the eager model; nothing "
                    f"was written:\n{report.summary()}",
                    path=str(dest),
                    report=report,
                    hint="look for randomness or train-mode behaviour in forward; if the "
                    "differences are rounding, pass looser rtol/atol",
                )
            stale = dest.with_name(dest.name + ".data")
            store.publish(
                [str(f) for f in sorted(files, key=lambda f: f == target)], str(dest.parent)
            )
            if fmt == "onnx" and len(files) == 1 and stale.is_file():
                # the previous export's weights, referred to by nothing now
                storage_for(stale).delete(str(stale))
    return report
