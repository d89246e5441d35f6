"""Comparing two checkpoints tensor by tensor: ``torchkeep.diff`` and ``torchkeep diff``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from torchkeep.format import load_file, tensors_by_path
from torchkeep.format._dtypes import dtype_name
from torchkeep.storage._location import with_options


@dataclass(frozen=True, kw_only=True, slots=True)
class TensorDiff:
    """One tensor present on both sides.

    Attributes:
        key: the tensor's dotted path.
        dtype: ``(dtype in a, dtype in b)``.
        shape: ``(shape in a, shape in b)``.
        max_abs_diff: the largest absolute difference (``None`` when shapes differ); ``inf``
            when a value is finite on one side only, ``nan`` never (NaN on both sides is equal).
        identical: the bytes are equal (same dtype, shape and every bit).
    """

    key: str
    dtype: tuple[str, str]
    shape: tuple[tuple[int, ...], tuple[int, ...]]
    max_abs_diff: float | None
    identical: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "dtype": list(self.dtype),
            "shape": [list(self.shape[0]), list(self.shape[1])],
            "max_abs_diff": self.max_abs_diff,
            "identical": self.identical,
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class DiffReport:
    """How checkpoint ``b`` differs from checkpoint ``a``.

    Attributes:
        a, b: what was compared.
        added: tensor keys only in ``b``.
        removed: tensor keys only in ``a``.
        changed: tensors on both sides that differ (in dtype, shape or values).
        identical: keys of the tensors equal bit for bit.
    """

    a: str
    b: str
    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[TensorDiff, ...]
    identical: tuple[str, ...]

    @property
    def same(self) -> bool:
        return not (self.added or self.removed or self.changed)

    @property
    def summary(self) -> str:
        if self.same:
            return f"identical: {len(self.identical)} tensors, every bit equal"
        reshaped = sum(
            1 for c in self.changed if c.shape[0] != c.shape[1] or c.dtype[0] != c.dtype[1]
        )
        return (
            f"{len(self.added)} added, {len(self.removed)} removed, {len(self.changed)} changed "
            f"({reshaped} in shape or dtype), {len(self.identical)} identical"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "summary": self.summary,
            "added": list(self.added),
            "removed": list(self.removed),
            "changed": [c.to_dict() for c in self.changed],
            "identical": list(self.identical),
        }


def _compare(key: str, x: torch.Tensor, y: torch.Tensor) -> TensorDiff:
    shapes = (tuple(x.shape), tuple(y.shape))
    dtypes = (dtype_name(x.dtype), dtype_name(y.dtype))
    if shapes[0] != shapes[1]:
        return TensorDiff(key=key, dtype=dtypes, shape=shapes, max_abs_diff=None, identical=False)
    x, y = x.detach().cpu(), y.detach().cpu()
    same_bits = x.dtype == y.dtype and (
        x.numel() == 0
        or torch.equal(
            x.contiguous().reshape(-1).view(torch.uint8),
            y.contiguous().reshape(-1).view(torch.uint8),
        )
    )
    if x.numel() == 0:
        return TensorDiff(
            key=key, dtype=dtypes, shape=shapes, max_abs_diff=0.0, identical=same_bits
        )
    wide = torch.complex128 if (x.is_complex() or y.is_complex()) else torch.float64
    try:
        xa, ya = x.to(wide), y.to(wide)
    except (RuntimeError, TypeError):  # dtypes with no arithmetic (bits, sub-byte ints)
        return TensorDiff(
            key=key, dtype=dtypes, shape=shapes, max_abs_diff=None, identical=same_bits
        )
    delta = (xa - ya).abs()
    both_nan = torch.isnan(xa.abs()) & torch.isnan(ya.abs())
    delta = torch.where(both_nan, torch.zeros_like(delta), delta)
    delta = torch.where(torch.isnan(delta), torch.full_like(delta, float("inf")), delta)
    return TensorDiff(
        key=key,
        dtype=dtypes,
        shape=shapes,
        max_abs_diff=float(delta.real.max()),
        identical=same_bits,
    )


def diff(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> DiffReport:
    """Compare two checkpoints (any format or run reference ``load`` reads), tensor by tensor.

    Returns:
        A :class:`DiffReport` with added, removed, changed and identical tensors.

    Example:
        >>> report = torchkeep.diff("before.safetensors", "runs/exp1@best")
        >>> print(report.summary)
    """
    a = with_options(a, storage_options)
    b = with_options(b, storage_options)
    ta, tb = tensors_by_path(load_file(a)), tensors_by_path(load_file(b))
    changed: list[TensorDiff] = []
    identical: list[str] = []
    for key in ta.keys() & tb.keys():
        result = _compare(key, ta[key], tb[key])
        if result.identical:
            identical.append(key)
        else:
            changed.append(result)
    order = {k: i for i, k in enumerate([*ta, *tb])}
    return DiffReport(
        a=os.fspath(a),
        b=os.fspath(b),
        added=tuple(k for k in tb if k not in ta),
        removed=tuple(k for k in ta if k not in tb),
        changed=tuple(sorted(changed, key=lambda c: order[c.key])),
        identical=tuple(sorted(identical, key=order.__getitem__)),
    )
