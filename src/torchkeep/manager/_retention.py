"""Which checkpoints a run keeps: a pure function of the checkpoints and the policy.

The rules combine as a union: a checkpoint is kept when any rule keeps it. The latest and the best
checkpoints are always kept, whatever the rules say, so that a run can always resume and its best
model is never lost. With no rule at all, everything is kept.

Ranking checkpoints by a metric is policy too, so :func:`rank_by_metric` lives here, and it is the
one order both retention and ``RUN@best`` use. The format layer reads runs but may not import this
layer: importing this module registers :func:`rank_by_metric` as the readers' default ranking
(``torchkeep.format._run.set_default_ranking``), and the manager also passes it explicitly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from torchkeep.errors import InvalidArgumentError
from torchkeep.format import Manifest, set_default_ranking
from torchkeep.format._run import as_float

Mode = Literal["min", "max"]
POLICY_FIELDS = ("keep_last", "keep_best", "keep_every", "monitor", "mode")
"""The fields of :class:`RetentionPolicy`, in its order (as stored in ``torchkeep_run.json``)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RetentionPolicy:
    """How many checkpoints a run keeps: the rules of ``CheckpointManager`` and ``prune``.

    The rules combine as a union, and the latest and the best checkpoint are always kept. A run
    stores its policy in ``torchkeep_run.json``, so a manager reopened without retention
    arguments keeps the same rules. Invalid values raise ``InvalidArgumentError`` here, before
    anything is deleted.

    Example:
        >>> policy = torchkeep.RetentionPolicy(keep_last=3, keep_best=1, monitor="val_loss")

    Attributes:
        keep_last: keep the N most recent checkpoints.
        keep_best: keep the K best by ``monitor``.
        keep_every: keep every checkpoint whose step is a multiple of E, for ever.
        monitor: the metric that ranks checkpoints (``"val_loss"``); needed by ``keep_best``.
        mode: ``"min"`` when lower is better, ``"max"`` when higher is.
    """

    keep_last: int | None = None
    keep_best: int | None = None
    keep_every: int | None = None
    monitor: str | None = None
    mode: Mode = "min"

    def __post_init__(self) -> None:
        for name in ("keep_last", "keep_best", "keep_every"):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < 1):
                raise InvalidArgumentError(
                    f"{name} must be a positive integer, not {value!r}",
                    hint=f"leave {name}=None to disable the rule",
                )
        if self.mode not in ("min", "max"):
            raise InvalidArgumentError(f"mode must be 'min' or 'max', not {self.mode!r}")
        if self.keep_best is not None and not self.monitor:
            raise InvalidArgumentError(
                "keep_best needs a metric to rank checkpoints by",
                hint="pass monitor='val_loss' (and mode='min' or 'max')",
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RetentionPolicy:
        return cls(**{k: data[k] for k in POLICY_FIELDS if k in data and data[k] is not None})


def select(
    checkpoints: Sequence[tuple[int, Mapping[str, Any]]], policy: RetentionPolicy
) -> dict[int, tuple[str, ...]]:
    """Decide which checkpoints to keep.

    Args:
        checkpoints: ``(step, metrics)`` of every committed checkpoint.
        policy: the retention rules.

    Returns:
        For each kept step, why it is kept (``"latest"``, ``"best"``, ``"keep_last"``,
        ``"keep_best"``, ``"keep_every"``, ``"no retention rule"``). Steps absent are to delete.
    """
    reasons: dict[int, list[str]] = {}

    def keep(step: int, why: str) -> None:
        reasons.setdefault(step, [])
        if why not in reasons[step]:
            reasons[step].append(why)

    steps = sorted({step for step, _ in checkpoints})
    if not steps:
        return {}
    keep(steps[-1], "latest")
    ranked = rank_by_metric(checkpoints, policy.monitor, policy.mode) if policy.monitor else []
    if ranked:
        keep(ranked[0], "best")
    no_rule = policy.keep_last is None and policy.keep_best is None and policy.keep_every is None
    for step in steps:
        if no_rule:
            keep(step, "no retention rule")
        if policy.keep_every is not None and step % policy.keep_every == 0:
            keep(step, "keep_every")
    if policy.keep_last is not None:
        for step in steps[-policy.keep_last :]:
            keep(step, "keep_last")
    if policy.keep_best is not None:
        for step in ranked[: policy.keep_best]:
            keep(step, "keep_best")
    return {step: tuple(why) for step, why in sorted(reasons.items())}


@dataclass(frozen=True, kw_only=True, slots=True)
class PrunePlan:
    """What a retention policy keeps of a run, and why; what it deletes.

    Returned by ``CheckpointManager.prune(..., dry_run=True)``, which deletes nothing.

    Attributes:
        policy: the rules the plan follows.
        keep: for each kept step, why (``"latest"``, ``"best"``, ``"keep_last"``, ...).
        delete: the steps the rules do not keep, ascending.
    """

    policy: RetentionPolicy
    keep: dict[int, tuple[str, ...]]
    delete: list[int]

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy.to_dict(),
            "keep": {str(step): list(why) for step, why in self.keep.items()},
            "delete": list(self.delete),
        }


def plan(
    checkpoints: Sequence[tuple[int, Mapping[str, Any]]], policy: RetentionPolicy
) -> PrunePlan:
    """:func:`select` as a plan: the kept steps with their reasons, and the steps to delete."""
    keep = select(checkpoints, policy)
    delete = sorted({step for step, _ in checkpoints} - set(keep))
    return PrunePlan(policy=policy, keep=keep, delete=delete)


def rank_by_metric(
    checkpoints: Iterable[tuple[int, Mapping[str, Any]]], monitor: str, mode: str
) -> list[int]:
    """Steps ordered best first by ``metrics[monitor]`` (``mode`` "min" or "max").

    Checkpoints without a numeric value (missing, bool, NaN) are left out. Ties go to the later
    step: it holds the most training. ``RUN@best`` and retention both rank with this.
    """
    scored = []
    for step, metrics in checkpoints:
        value = metrics.get(monitor)
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = as_float(value)
            if not math.isnan(number):
                scored.append((number, step))
    sign = 1.0 if mode == "min" else -1.0
    return [step for _, step in sorted(scored, key=lambda s: (sign * s[0], -s[1]))]


def best_of(manifests: list[Manifest], monitor: str, mode: str) -> Manifest | None:
    """The manifest whose ``metrics[monitor]`` is best (``mode`` "min" or "max"); NaN never wins."""
    ranked = rank_by_metric(((m.step, m.metrics) for m in manifests), monitor, mode)
    return next((m for m in manifests if m.step == ranked[0]), None) if ranked else None


set_default_ranking(rank_by_metric)  # RUN@best of every reader: see the module docstring
