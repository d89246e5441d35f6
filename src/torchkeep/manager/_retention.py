"""Which checkpoints a run keeps: a pure function of the checkpoints and the policy.

The rules combine as a union: a checkpoint is kept when any rule keeps it. The latest and the best
checkpoints are always kept, whatever the rules say, so that a run can always resume and its best
model is never lost. With no rule at all, everything is kept.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from torchkeep.errors import InvalidArgumentError
from torchkeep.format import rank_by_metric

Mode = Literal["min", "max"]


@dataclass(frozen=True, kw_only=True, slots=True)
class RetentionPolicy:
    """How many checkpoints a run keeps.

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
        fields = ("keep_last", "keep_best", "keep_every", "monitor", "mode")
        return cls(**{k: data[k] for k in fields if k in data and data[k] is not None})


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
