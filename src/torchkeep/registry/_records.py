"""What the registry reports: alias moves, lineage, comparisons and verification."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from torchkeep.format import ModelVersion


@dataclass(frozen=True, kw_only=True, slots=True)
class AliasMove:
    """One move of an alias: who moved it, from which version to which, and when.

    ``from_version`` is ``None`` when the alias was created; ``to_version`` when it was removed.
    """

    name: str
    alias: str
    from_version: str | None
    to_version: str | None
    user: str
    host: str
    pid: int
    time: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, kw_only=True, slots=True)
class Lineage:
    """A version, the versions it descends from (nearest first) and those fine-tuned from it."""

    version: ModelVersion
    ancestors: tuple[ModelVersion, ...]
    descendants: tuple[ModelVersion, ...]
    missing: tuple[str, ...] = ()
    """Parents recorded but deleted since (``NAME@VERSION``)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version.to_dict(),
            "ancestors": [v.to_dict() for v in self.ancestors],
            "descendants": [v.to_dict() for v in self.descendants],
            "missing": list(self.missing),
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class TensorComparison:
    """One tensor of two versions.

    ``relative_l2`` is ``||b - a|| / ||a||`` (``inf`` when ``a`` is zero and ``b`` is not),
    ``cosine`` the cosine similarity of the flattened tensors, ``changed`` the share of
    elements that differ; ``None`` when the shapes or dtypes differ (``note`` says so).
    """

    name: str
    identical: bool
    relative_l2: float | None
    cosine: float | None
    changed: float | None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in asdict(self).items()
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class Comparison:
    """Per-tensor comparison of two versions of a model (``compare(name, v1, v2)``)."""

    name: str
    v1: str
    v2: str
    tensors: tuple[TensorComparison, ...]
    only_in_v1: tuple[str, ...] = ()
    only_in_v2: tuple[str, ...] = ()

    @property
    def identical(self) -> tuple[str, ...]:
        """Names of the tensors equal in both versions (frozen during the fine-tune)."""
        return tuple(t.name for t in self.tensors if t.identical)

    @property
    def changed(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors if not t.identical)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "v1": self.v1,
            "v2": self.v2,
            "tensors": [t.to_dict() for t in self.tensors],
            "identical": list(self.identical),
            "only_in_v1": list(self.only_in_v1),
            "only_in_v2": list(self.only_in_v2),
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class RegistryReport:
    """What :meth:`Registry.verify` checked; ``ok`` when ``problems`` is empty."""

    registry: str
    versions: int
    tensors: int
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def compare_tensor(name: str, a: torch.Tensor, b: torch.Tensor) -> TensorComparison:
    """Relative L2, cosine and share of changed elements of ``b`` against ``a``."""
    if a.shape != b.shape or a.dtype != b.dtype:
        note = f"{a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}"
        return TensorComparison(
            name=name, identical=False, relative_l2=None, cosine=None, changed=None, note=note
        )
    identical = bool(torch.equal(a, b))
    if a.numel() == 0:
        return TensorComparison(name=name, identical=True, relative_l2=0.0, cosine=1.0, changed=0.0)
    changed = float((a != b).sum().item()) / a.numel()
    if a.dtype == torch.bool or not (a.is_floating_point() or a.is_complex()):
        af, bf = a.double(), b.double()
    else:
        af, bf = (
            a.detach().to(torch.complex128 if a.is_complex() else torch.float64),
            b.detach().to(torch.complex128 if b.is_complex() else torch.float64),
        )
    af, bf = af.flatten(), bf.flatten()
    na, nb, nd = af.norm().item(), bf.norm().item(), (bf - af).norm().item()
    rel = 0.0 if nd == 0 else (nd / na if na else math.inf)
    cos = (
        1.0
        if na == 0 and nb == 0
        else 0.0
        if na == 0 or nb == 0
        else float(
            (torch.vdot(af, bf).real if af.is_complex() else torch.dot(af, bf)).item() / (na * nb)
        )
    )
    return TensorComparison(
        name=name, identical=identical, relative_l2=rel, cosine=cos, changed=changed
    )
