"""Models of the registry tests: importable (the registry records their class path)."""

from __future__ import annotations

import torch
from torch import nn

import torchkeep as tk


@tk.capture_config
class Classifier(nn.Module):
    """A frozen-able backbone and a head."""

    def __init__(self, d_in: int = 8, hidden: int = 64, classes: int = 3) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class Plain(nn.Module):
    """No captured config: the registry returns its state dict unless config= fits."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
