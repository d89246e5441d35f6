"""torchkeep.load_into end to end: peak memory stays near one copy of the weights."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

import torchkeep

from ..helpers import MIB, run_py


def test_load_into_keeps_peak_memory_near_one_copy(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(2048, 2048, bias=False) for _ in range(4)])  # 64 MiB
    path = tmp_path / "big.safetensors"
    torchkeep.save(model.state_dict(), path)
    small = tmp_path / "small.safetensors"
    torchkeep.save(nn.Linear(2, 2).state_dict(), small)
    sums = " ".join(repr(float(p.detach().double().sum())) for p in model.parameters())
    del model
    out = run_py(
        """
        import torch, torchkeep
        from torch import nn
        torchkeep.load_into(nn.Linear(2, 2), sys.argv[2])  # warm up imports
        torch.manual_seed(1)
        model = nn.Sequential(*[nn.Linear(2048, 2048, bias=False) for _ in range(4)])
        gc.collect()
        before = rss()
        report = torchkeep.load_into(model, sys.argv[1])
        grown = rss() - before
        print(grown, len(report.loaded))
        print(" ".join(repr(float(p.detach().double().sum())) for p in model.parameters()))
        """,
        str(path),
        str(small),
    )
    first, second = out.strip().splitlines()
    grown, loaded = first.split()
    assert int(loaded) == 4
    assert int(grown) < 0.5 * 64 * MIB, f"RSS grew by {int(grown) / MIB:.1f} MiB"
    for want, got in zip(sums.split(), second.split(), strict=True):
        assert math.isclose(float(want), float(got), rel_tol=1e-9, abs_tol=1e-6)
