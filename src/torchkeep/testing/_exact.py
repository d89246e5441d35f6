"""Bit-exact comparison of two training runs: their losses and their final checkpoints."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

MORE_PATHS_SHOWN = 8


def _float_text(x: float) -> str:
    return f"{x.hex()} ({x!r})"


def _same_float(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a.hex() == b.hex()  # tells 0.0 from -0.0


def _loss_divergence(straight: Sequence[float], resumed: Sequence[Sequence[float]]) -> str | None:
    """The first difference between the straight run's losses and the resumed invocations' ones.

    Returns ``None`` when the concatenated ``resumed`` losses equal ``straight`` bit for bit.
    """
    flat = [x for part in resumed for x in part]
    owner = [(i, j) for i, part in enumerate(resumed) for j in range(len(part))]

    def where(k: int) -> str:
        i, j = owner[k]
        return f"resumed invocation {i + 1} of {len(resumed)}, its loss {j}"

    for k, (a, b) in enumerate(zip(straight, flat, strict=False)):
        if not _same_float(a, b):
            return (
                f"losses first differ at index {k} ({where(k)}): "
                f"straight run {_float_text(a)}, resumed run {_float_text(b)}"
            )
    if len(straight) == len(flat):
        return None
    counts = " + ".join(str(len(p)) for p in resumed)
    k = min(len(straight), len(flat))
    if len(straight) > k:
        nxt = f"the straight run's loss {k} is {_float_text(straight[k])}"
    else:
        nxt = f"the resumed run's loss {k} ({where(k)}) is {_float_text(flat[k])}"
    return (
        f"the straight run logged {len(straight)} losses, the resumed run {len(flat)} "
        f"({counts}); the first {k} agree, {nxt}"
    )


class _StateComparison:
    """Walks two nested states side by side and records every difference, in walk order.

    Dicts are compared by keys (in the first state's order), lists and tuples by position,
    tensors and NumPy arrays by dtype, shape and bytes, floats bit for bit, other values by type
    and ``==``.
    """

    def __init__(self) -> None:
        self.tensors = 0
        self.values = 0
        self.differences: list[tuple[str, str]] = []

    def compare(self, a: Any, b: Any, path: str = "") -> None:
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            self.tensors += 1
            self._note(path, _tensor_difference(a, b))
        elif isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
            self.tensors += 1
            self._note(path, _array_difference(a, b))
        elif isinstance(a, Mapping) and isinstance(b, Mapping):
            only_a = [k for k in a if k not in b]
            only_b = [k for k in b if k not in a]
            if only_a or only_b:
                self._note(
                    path,
                    f"keys only in the straight run: {only_a}, only in the resumed run: {only_b}",
                )
            for key in a:
                if key in b:
                    self.compare(a[key], b[key], f"{path}.{key}" if path else str(key))
        elif type(a) is not type(b):
            self.values += 1
            self._note(path, _value_difference(a, b))
        elif isinstance(a, list | tuple) and _all_scalars(a) and _all_scalars(b):
            self.values += len(a)
            self._note(path, _sequence_difference(a, b))
        elif isinstance(a, list | tuple):
            if len(a) != len(b):
                self._note(path, f"{type(a).__name__} of length {len(a)} vs {len(b)}")
            for i, (x, y) in enumerate(zip(a, b, strict=False)):
                self.compare(x, y, f"{path}.{i}" if path else str(i))
        else:
            self.values += 1
            self._note(path, _value_difference(a, b))

    def _note(self, path: str, difference: str | None) -> None:
        if difference is not None:
            self.differences.append((path or "(the whole state)", difference))

    def summary(self) -> list[str]:
        """Lines for an error message: the first difference in full, then the other paths."""
        if not self.differences:
            return []
        path, what = self.differences[0]
        lines = [f"the final checkpoints first differ at {path}: {what}"]
        others = [p for p, _ in self.differences[1:]]
        if others:
            shown = ", ".join(others[:MORE_PATHS_SHOWN])
            more = (
                f", ... ({len(others) - MORE_PATHS_SHOWN} more)"
                if len(others) > MORE_PATHS_SHOWN
                else ""
            )
            lines.append(f"{len(others)} more entries differ: {shown}{more}")
        return lines


_SCALARS = (type(None), bool, int, float, complex, str, bytes)


def _all_scalars(values: Sequence[Any]) -> bool:
    return all(isinstance(v, _SCALARS) for v in values)


def _sequence_difference(a: Sequence[Any], b: Sequence[Any]) -> str | None:
    """A list of scalars (a generator state, betas...) is reported as one entry, like a tensor."""
    kind = type(a).__name__
    differ = [i for i, (x, y) in enumerate(zip(a, b, strict=False)) if _value_difference(x, y)]
    if len(a) != len(b):
        agree = f"the first {differ[0] if differ else min(len(a), len(b))} elements agree"
        return f"{kind} of length {len(a)} vs {len(b)} ({agree})"
    if not differ:
        return None
    i = differ[0]
    return (
        f"{kind} of {len(a)}: {len(differ)} elements differ, first at index {i}: "
        f"{_element_text(a[i])} vs {_element_text(b[i])}"
    )


def _value_difference(a: Any, b: Any) -> str | None:
    if type(a) is not type(b):
        return f"{type(a).__name__} {a!r:.80} vs {type(b).__name__} {b!r:.80}"
    if isinstance(a, float):
        return None if _same_float(a, b) else f"{_float_text(a)} vs {_float_text(b)}"
    try:
        same = bool(a == b)
    except Exception:  # an exotic __eq__: fall back to the text
        same = repr(a) == repr(b)
    return None if same else f"{a!r:.200} vs {b!r:.200}"


def _index(flat: int, shape: Sequence[int]) -> tuple[int, ...]:
    index = []
    for size in reversed(shape):
        flat, rest = divmod(flat, size)
        index.append(rest)
    return tuple(reversed(index))


def _element_text(x: Any) -> str:
    return _float_text(x) if isinstance(x, float) else repr(x)


def _tensor_difference(a: torch.Tensor, b: torch.Tensor) -> str | None:
    """How two tensors differ (dtype, shape, or elements: count, max abs diff, first index).

    Elements are compared by their bytes: ``0.0`` and ``-0.0`` differ, equal NaNs do not.
    """
    if a.dtype != b.dtype:
        return f"dtype {a.dtype} vs {b.dtype}"
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    a, b = (_plain_cpu(t) for t in (a, b))
    n = a.numel()
    if n == 0:
        return None
    size = a.element_size()
    a_bytes = a.reshape(-1).view(torch.uint8).reshape(n, size)
    b_bytes = b.reshape(-1).view(torch.uint8).reshape(n, size)
    differ = (a_bytes != b_bytes).any(dim=1)
    count = int(differ.sum())
    if count == 0:
        return None
    first = int(differ.nonzero()[0, 0])
    a_flat, b_flat = a.reshape(-1), b.reshape(-1)
    max_diff = "n/a"
    if a.dtype != torch.bool:
        try:
            wide = torch.complex128 if a.is_complex() else torch.float64
            diff = (a_flat[differ].to(wide) - b_flat[differ].to(wide)).abs().max()
            max_diff = f"{float(diff):.6g}"
        except (RuntimeError, TypeError):  # a dtype without arithmetic
            pass
    return (
        f"{str(a.dtype).removeprefix('torch.')} {tuple(a.shape)}: {count} of {n} elements "
        f"differ, max abs diff {max_diff}, first at index {_index(first, a.shape)}: "
        f"{_element_text(a_flat[first].item())} vs {_element_text(b_flat[first].item())}"
    )


def _plain_cpu(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    if t.layout != torch.strided:
        t = t.to_dense()
    return t.resolve_conj().resolve_neg().contiguous()


def _array_difference(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> str | None:
    if a.dtype != b.dtype:
        return f"dtype {a.dtype} vs {b.dtype}"
    if a.shape != b.shape:
        return f"shape {a.shape} vs {b.shape}"
    if a.dtype.hasobject:
        return _value_difference(a.tolist(), b.tolist())
    n = a.size
    if n == 0:
        return None
    a_flat, b_flat = np.ascontiguousarray(a).reshape(-1), np.ascontiguousarray(b).reshape(-1)
    a_bytes = a_flat.view(np.uint8).reshape(n, a.dtype.itemsize)
    b_bytes = b_flat.view(np.uint8).reshape(n, a.dtype.itemsize)
    differ = (a_bytes != b_bytes).any(axis=1)
    count = int(differ.sum())
    if count == 0:
        return None
    first = int(np.flatnonzero(differ)[0])
    max_diff = "n/a"
    if a.dtype.kind in "iuf":
        wide = np.abs(a_flat[differ].astype(np.float64) - b_flat[differ].astype(np.float64))
        max_diff = f"{float(wide.max()):.6g}"
    elif a.dtype.kind == "c":
        max_diff = f"{float(np.abs(a_flat[differ] - b_flat[differ]).max()):.6g}"
    return (
        f"numpy {a.dtype} {a.shape}: {count} of {n} elements differ, max abs diff {max_diff}, "
        f"first at index {_index(first, a.shape)}: "
        f"{_element_text(a_flat[first].item())} vs {_element_text(b_flat[first].item())}"
    )
