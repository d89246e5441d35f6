"""Comparing an exported artifact's outputs with the eager model's, and timing both."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree

from torchkeep._export._report import OutputCheck

__all__ = ["compare", "flat_outputs", "median_ms", "tolerance"]

# torch.testing.assert_close's defaults, which torch.onnx's own assert_onnx_program applies.
_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float32: (1.3e-6, 1e-5),
    torch.float64: (1e-7, 1e-7),
    torch.complex64: (1.3e-6, 1e-5),
    torch.complex128: (1e-7, 1e-7),
}


def tolerance(dtype: torch.dtype, rtol: float | None, atol: float | None) -> tuple[float, float]:
    """``(rtol, atol)`` for outputs of ``dtype``: the caller's, else assert_close's defaults;
    integers and booleans compare exactly."""
    default = _TOLERANCES.get(dtype, (0.0, 0.0))
    if not (dtype.is_floating_point or dtype.is_complex):
        return 0.0, 0.0
    return (default[0] if rtol is None else rtol, default[1] if atol is None else atol)


def flat_outputs(out: Any) -> list[tuple[str, Any]]:
    """Every leaf of a model's output by name (``output``, ``output[0]``, ``output['y']``);
    ``None`` leaves, which no exported format returns, are dropped."""
    leaves = pytree.tree_flatten_with_path(out)[0]
    return [("output" + pytree.keystr(path), leaf) for path, leaf in leaves if leaf is not None]


def _as_tensor(x: Any) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    t = t.detach().cpu()
    return torch.view_as_real(t) if t.is_complex() else t


def compare(
    case: str,
    name: str,
    expected: Any,
    actual: Any,
    rtol: float | None,
    atol: float | None,
) -> OutputCheck:
    """One output of one case: errors and verdict (``torch.testing.assert_close`` semantics)."""
    want, got = _as_tensor(expected), _as_tensor(actual)
    r, a = tolerance(want.dtype, rtol, atol)
    shape, dtype = tuple(want.shape), str(want.dtype).removeprefix("torch.")

    def check(ok: bool, abs_err: float, rel_err: float, problem: str | None) -> OutputCheck:
        return OutputCheck(case, name, shape, dtype, abs_err, rel_err, r, a, ok, problem)

    if got.shape != want.shape:
        return check(False, float("inf"), float("inf"), f"shape {tuple(got.shape)}, not {shape}")
    if got.dtype != want.dtype:
        got_dtype = str(got.dtype).removeprefix("torch.")
        return check(False, float("inf"), float("inf"), f"dtype {got_dtype}, not {dtype}")
    if want.numel() == 0:
        return check(True, 0.0, 0.0, None)
    w, g = want.double(), got.double()
    nan_w, nan_g = torch.isnan(w), torch.isnan(g)
    if not torch.equal(nan_w, nan_g):
        return check(False, float("inf"), float("inf"), "NaNs in different places")
    finite = ~nan_w
    w, g = w[finite], g[finite]
    same = w == g  # equal infinities give NaN differences otherwise
    diff = torch.where(same, torch.zeros_like(w), (g - w).abs())
    if diff.numel() == 0:
        return check(True, 0.0, 0.0, None)
    abs_err = float(diff.max())
    rel_err = float((diff / w.abs().clamp_min(a if a > 0 else 1e-12)).max())
    ok = bool((diff <= a + r * w.abs()).all())
    bad = int((diff > a + r * w.abs()).sum())
    return check(ok, abs_err, rel_err, None if ok else f"{bad} of {w.numel()} values differ")


def median_ms(fn: Callable[[], Any], runs: int, *, budget_s: float = 3.0) -> tuple[float, int]:
    """Median wall time of ``fn`` in milliseconds after one warm-up run, and the runs timed.

    At least three runs, then stops at ``runs`` or when ``budget_s`` is spent.
    """
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max(runs, 1):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 3 and time.perf_counter() - start > budget_s:
            break
    return statistics.median(times), len(times)
