"""What the steps of ``torchkeep demo`` share: the file names and :class:`DemoRun`.

Both step modules (``_demo`` and ``_demo_resume``) import it, so neither imports the other's
types: ``_demo`` lists the steps, ``_demo_resume`` adds the checkpoint-run ones.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import torchkeep as tk
from torchkeep.cli._demo_model import DemoData, DemoMLP

__all__ = [
    "CHECKPOINT_NAME",
    "EXPORT_ONNX",
    "EXPORT_PT2",
    "MODEL_DIR_NAME",
    "PLOT_NAME",
    "RUN_DIR_NAME",
    "STRAIGHT_DIR_NAME",
    "DemoRun",
]

CHECKPOINT_NAME = "checkpoint.safetensors"
MODEL_DIR_NAME = "model"
EXPORT_ONNX = "model.onnx"
EXPORT_PT2 = "model.pt2"
RUN_DIR_NAME = "run"
STRAIGHT_DIR_NAME = "run-uninterrupted"
PLOT_NAME = "curves.png"


@dataclass
class DemoRun:
    """What the steps share: the options, then each step's results.

    Fields without a default are set by the step that produces them.
    """

    workdir: Path
    epochs: int
    seed: int
    hparams: dict[str, Any]
    data: DemoData = field(init=False)
    model: DemoMLP = field(init=False)
    optimizer: torch.optim.Optimizer = field(init=False)
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    #: check name -> whether reloaded predictions equal the trained model's, bit for bit.
    identical: dict[str, bool] = field(default_factory=dict)
    #: whether the stopped-and-resumed run ended bit-identical to the uninterrupted one.
    resumed_exactly: bool | None = None
    exported: tk.ExportReport | None = None
    #: the version registered at the end, aliased "production".
    registered: tk.ModelVersion | None = None
    started: float = field(default_factory=time.perf_counter)

    @property
    def checkpoint(self) -> Path:
        return self.workdir / CHECKPOINT_NAME

    @property
    def model_dir(self) -> Path:
        return self.workdir / MODEL_DIR_NAME

    @property
    def run_dir(self) -> Path:
        return self.workdir / RUN_DIR_NAME

    @property
    def registry_dir(self) -> Path:
        return self.workdir / "models"

    @property
    def straight_dir(self) -> Path:
        return self.workdir / STRAIGHT_DIR_NAME

    @property
    def plot_path(self) -> Path:
        return self.workdir / PLOT_NAME
