"""``RUN@best`` is ranked by the function the reader is given; by default retention's own."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

import torchkeep as tk
from torchkeep.format import RunReader, load_reference
from torchkeep.manager._retention import rank_by_metric


def _oldest_first(checkpoints: Iterable[tuple[int, Mapping[str, Any]]], *_: str) -> list[int]:
    return sorted(step for step, _ in checkpoints)


def test_best_uses_the_ranking_given_or_the_registered_default(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with tk.CheckpointManager(run, monitor="val_loss") as mgr:
        for step, loss in enumerate([3.0, 1.0, 2.0]):
            mgr.save(step, {"w": torch.zeros(2)}, metrics={"val_loss": loss})
        assert mgr.best is not None and mgr.best.step == 1
    assert RunReader(run).resolve("best").step == 1  # the default: retention's ranking
    assert RunReader(run, ranking=rank_by_metric).resolve("best").step == 1
    assert RunReader(run, ranking=_oldest_first).resolve("best").step == 0
    step = load_reference(f"{run}@best", lambda _, m: m.step, ranking=_oldest_first)
    assert step == 0
