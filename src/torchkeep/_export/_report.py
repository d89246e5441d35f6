"""What an export produced and how closely it computes what the eager model computes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ExportReport", "InputSpec", "OutputCheck"]


@dataclass(frozen=True)
class InputSpec:
    """One tensor input of the exported artifact.

    Attributes:
        name: the input's name (the ``forward`` parameter, or ``x_0``-style for nested inputs).
        shape: the example's shape.
        dtype: the example's dtype, as torch names it without ``torch.``.
        dynamic: dimension index -> symbolic name, for the dimensions left dynamic.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    dynamic: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputCheck:
    """One output compared between the eager model and the exported artifact on one input case.

    ``max_rel_error`` is ``|exported - eager| / |eager|``, with ``|eager|`` floored at ``atol``
    so that values near zero do not report meaningless ratios. ``ok`` follows
    ``torch.testing.assert_close``: every element within ``atol + rtol * |eager|``, NaNs in the
    same places, same shape and dtype.
    """

    case: str
    output: str
    shape: tuple[int, ...]
    dtype: str
    max_abs_error: float
    max_rel_error: float
    rtol: float
    atol: float
    ok: bool
    problem: str | None = None


@dataclass
class ExportReport:
    """The result of :func:`torchkeep.export`.

    Attributes:
        path: the artifact written (its main file).
        format: ``"onnx"``, ``"pt2"`` or ``"torchscript"``.
        files: every file of the artifact (``model.onnx`` and ``model.onnx.data`` are one);
            empty when verification failed, since nothing was written then.
        size_bytes: their total size (of the rejected artifact, when verification failed).
        source: what was exported (the model's class, or the reference it was loaded from).
        inputs: the artifact's tensor inputs, with their dynamic dimensions.
        outputs: the output names, in order.
        checks: one :class:`OutputCheck` per input case and output.
        eager_latency_ms: median latency of the eager model on the example inputs.
        exported_latency_ms: the same for the exported artifact, loaded from its file.
        latency_runs: the number of timed runs behind each median.
        opset: the ONNX opset written (ONNX only).
        runtime: what ran the artifact (``onnxruntime 1.x``, ``torch 2.x``).
        notes: what the user should know (deprecations, decisions taken, exporter warnings).
    """

    path: str
    format: str
    files: list[str]
    size_bytes: int
    source: str
    inputs: list[InputSpec]
    outputs: list[str]
    checks: list[OutputCheck]
    eager_latency_ms: float
    exported_latency_ms: float
    latency_runs: int
    runtime: str
    opset: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every output matched on every input case."""
        return all(c.ok for c in self.checks)

    @property
    def cases(self) -> list[str]:
        """The input cases verified, in order (``"example (batch 2)"``, ``"batch 1"``...)."""
        return list(dict.fromkeys(c.case for c in self.checks))

    def worst(self) -> list[OutputCheck]:
        """Per output, its worst check: a failed one first, then the largest absolute error."""
        by_output: dict[str, OutputCheck] = {}
        for c in self.checks:
            held = by_output.get(c.output)
            if held is None or (not c.ok, c.max_abs_error) > (not held.ok, held.max_abs_error):
                by_output[c.output] = c
        return [by_output[name] for name in self.outputs if name in by_output]

    @property
    def max_abs_error(self) -> dict[str, float]:
        """Per output, the largest absolute error over every input case."""
        return {c.output: c.max_abs_error for c in self.worst()}

    @property
    def max_rel_error(self) -> dict[str, float]:
        """Per output, the largest relative error over every input case."""
        out: dict[str, float] = {}
        for c in self.checks:
            out[c.output] = max(out.get(c.output, 0.0), c.max_rel_error)
        return out

    @property
    def speedup(self) -> float:
        """Eager latency over exported latency (above 1: the export runs faster)."""
        return self.eager_latency_ms / self.exported_latency_ms if self.exported_latency_ms else 0.0

    def failures(self) -> list[OutputCheck]:
        return [c for c in self.checks if not c.ok]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field, plus ``ok``, ``cases`` and per-output maxima."""
        out = dataclasses.asdict(self)
        for spec in out["inputs"]:
            spec["shape"] = list(spec["shape"])
            spec["dynamic"] = {str(k): v for k, v in spec["dynamic"].items()}
        for check in out["checks"]:
            check["shape"] = list(check["shape"])
        out["ok"] = self.ok
        out["cases"] = self.cases
        out["max_abs_error"] = self.max_abs_error
        out["max_rel_error"] = self.max_rel_error
        out["speedup"] = self.speedup
        return out

    def summary(self) -> str:
        """A few lines for a log: verdict, errors per output, latency, size."""
        verdict = "verified" if self.ok else f"MISMATCH in {len(self.failures())} check(s)"
        lines = [
            f"{self.path} ({self.format}, {_size(self.size_bytes)}): {verdict} on "
            f"{len(self.cases)} input case(s): {', '.join(self.cases)}"
        ]
        rel = self.max_rel_error
        for c in self.worst():
            lines.append(
                f"  {c.output}: max abs error {c.max_abs_error:.3g}, max rel error "
                f"{rel[c.output]:.3g} (rtol {c.rtol:g}, atol {c.atol:g})"
                + (
                    ""
                    if c.ok
                    else f"  FAILED on {c.case}" + (f": {c.problem}" if c.problem else "")
                )
            )
        lines.append(
            f"  latency: eager {self.eager_latency_ms:.3f} ms, exported "
            f"{self.exported_latency_ms:.3f} ms, median of {self.latency_runs} runs; {self.runtime}"
        )
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _size(n: int) -> str:
    units = ("B", "KiB", "MiB", "GiB")
    value, i = float(n), 0
    while value >= 1024 and i < len(units) - 1:
        value, i = value / 1024, i + 1
    return f"{n} B" if i == 0 else f"{value:.1f} {units[i]}"
