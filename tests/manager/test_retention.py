"""Retention is a pure function: which steps survive, and why."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from torchkeep import InvalidArgumentError
from torchkeep.manager import RetentionPolicy, select


def runs(losses: list[float | None]) -> list[tuple[int, dict[str, Any]]]:
    return [(i, {} if v is None else {"val_loss": v}) for i, v in enumerate(losses)]


def test_no_rule_keeps_everything() -> None:
    kept = select(runs([3.0, 2.0, 1.0]), RetentionPolicy())
    assert sorted(kept) == [0, 1, 2]
    assert kept[2] == ("latest", "no retention rule")


def test_keep_last_and_best_union() -> None:
    policy = RetentionPolicy(keep_last=2, keep_best=1, monitor="val_loss", mode="min")
    kept = select(runs([5.0, 1.0, 4.0, 3.0, 6.0]), policy)
    assert sorted(kept) == [1, 3, 4]
    assert "best" in kept[1] and "keep_best" in kept[1]
    assert kept[4] == ("latest", "keep_last")


def test_mode_max_and_ties_prefer_later_step() -> None:
    policy = RetentionPolicy(keep_best=1, monitor="acc", mode="max")
    kept = select(
        [(0, {"acc": 0.9}), (1, {"acc": 0.5}), (2, {"acc": 0.9}), (3, {"acc": 0.1})], policy
    )
    assert sorted(kept) == [2, 3]
    assert kept[2] == ("best", "keep_best")


def test_keep_every_keeps_multiples_for_ever() -> None:
    kept = select(runs([1.0] * 11), RetentionPolicy(keep_last=1, keep_every=5))
    assert sorted(kept) == [0, 5, 10]


def test_nan_and_missing_metrics_are_never_best() -> None:
    policy = RetentionPolicy(keep_best=1, keep_last=1, monitor="val_loss")
    kept = select(runs([math.nan, None, 2.0, math.nan]), policy)
    assert sorted(kept) == [2, 3]
    assert "best" in kept[2]


def test_empty_run_keeps_nothing() -> None:
    assert select([], RetentionPolicy(keep_last=1)) == {}


@pytest.mark.parametrize(
    "kwargs",
    [{"keep_last": 0}, {"keep_best": 1}, {"keep_every": -2}, {"mode": "avg"}, {"keep_last": 1.5}],
)
def test_invalid_policies_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        RetentionPolicy(**kwargs)
    assert isinstance(info.value, ValueError)  # the builtin a caller would catch


@given(
    losses=st.lists(st.one_of(st.none(), st.floats(allow_nan=True)), min_size=1, max_size=30),
    keep_last=st.one_of(st.none(), st.integers(1, 5)),
    keep_best=st.one_of(st.none(), st.integers(1, 5)),
    keep_every=st.one_of(st.none(), st.integers(1, 7)),
)
def test_latest_and_best_always_survive(
    losses: list[float | None], keep_last: int | None, keep_best: int | None, keep_every: int | None
) -> None:
    policy = RetentionPolicy(
        keep_last=keep_last, keep_best=keep_best, keep_every=keep_every, monitor="val_loss"
    )
    checkpoints = runs(losses)
    kept = select(checkpoints, policy)
    assert len(losses) - 1 in kept
    finite = [(v, i) for i, v in enumerate(losses) if v is not None and not math.isnan(v)]
    if finite:
        best_value = min(v for v, _ in finite)
        assert any(losses[s] == best_value for s in kept)
    if keep_last is not None:
        assert set(range(max(0, len(losses) - keep_last), len(losses))) <= set(kept)
    if keep_every is not None:
        assert {i for i in range(len(losses)) if i % keep_every == 0} <= set(kept)
    upper = (
        2
        + (keep_last or 0)
        + (keep_best or 0)
        + (len(losses) // keep_every + 1 if keep_every else 0)
    )
    if keep_last or keep_best or keep_every:
        assert len(kept) <= upper
