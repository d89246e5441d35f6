"""Helpers shared by the tests of saving and loading single files (``tests/io``, ``tests/format``)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import torch
from torch import nn

import torchkeep
from torchkeep import TorchkeepError

from .models import BNNet

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = [".safetensors", ".pt"]
MIB = 1024 * 1024


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random bytes of any dtype (bool stays 0/1)."""
    g = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    if dtype is torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (numel * itemsize,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


def roundtrip(obj: Any, path: Path, **load_kwargs: Any) -> Any:
    torchkeep.save(obj, path)
    return torchkeep.load(path, **load_kwargs)


def shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def tutorial_checkpoint(seed: int = 0) -> tuple[dict[str, Any], nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = BNNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
    ckpt = {
        "epoch": 5,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": opt.state_dict(),
        "loss": 0.25,
        "loss_tensor": torch.tensor(0.25),
        "best": None,
        "finished": False,
        "name": "run-1 ✓",
        "hparams": {"lr": 1e-3, "betas": (0.9, 0.99), "layers": [4, 4]},
        "input_size": torch.Size([8, 4]),
        "dtype": torch.bfloat16,
        "device": torch.device("cpu"),
    }
    return ckpt, model, opt


def temporaries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tkp-" in p.name)


def assert_helpful(exc: TorchkeepError, path: Path) -> None:
    assert str(path) in str(exc)
    assert exc.hint


_RSS = """
import os, sys, gc
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
"""


def run_py(code: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", _RSS + textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout
