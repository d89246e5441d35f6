"""TorchScript: script or trace, freeze, optimize for inference, save.

Deprecated upstream (torch.export is its successor) and kept for users whose runtime is
libtorch in C++. ``script`` keeps Python control flow; ``trace`` records one run and bakes in
what it saw (branches taken, Python numbers), which the verification on other batch sizes is
there to catch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from torchkeep._export._inputs import Inputs

__all__ = ["DEPRECATION", "Method", "build", "load", "save"]

Method = Literal["script", "trace"]
DEPRECATION = (
    "TorchScript is deprecated upstream in favour of torch.export; use it for a libtorch (C++) "
    "runtime, prefer format='pt2' or 'onnx' otherwise"
)


def build(
    model: nn.Module, inputs: Inputs, *, method: Method, optimize: bool
) -> torch.jit.ScriptModule:
    """The scripted or traced module, frozen and (with ``optimize``) optimized for inference."""
    scripted: Any
    if method == "script":
        scripted = torch.jit.script(model)
    elif inputs.kwargs:
        scripted = torch.jit.trace(  # type: ignore[no-untyped-call]  # torch.jit.trace is unannotated
            model, example_kwarg_inputs=inputs.kwargs, check_trace=False, strict=False
        )
    else:
        scripted = torch.jit.trace(  # type: ignore[no-untyped-call]  # torch.jit.trace is unannotated
            model, inputs.args, check_trace=False, strict=False
        )
    frozen: torch.jit.ScriptModule = torch.jit.freeze(scripted.eval())
    return torch.jit.optimize_for_inference(frozen) if optimize else frozen


def save(module: torch.jit.ScriptModule, path: Path) -> None:
    torch.jit.save(module, str(path))


def load(path: Path) -> torch.jit.ScriptModule:
    module: torch.jit.ScriptModule = torch.jit.load(  # type: ignore[no-untyped-call]  # torch.jit.load is unannotated
        str(path), map_location="cpu"
    )
    return module
