"""Models the ``torchkeep export`` tests save and export: importable by the CLI's subprocess,
so that ``torchkeep.load_model`` can rebuild them from their ``save_model`` directory."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import torchkeep


@torchkeep.capture_config
class TinyNet(nn.Module):
    """Two linear layers: exports to every format."""

    def __init__(self, features: int = 4, hidden: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.fc2 = nn.Linear(hidden, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


@torchkeep.capture_config
class AlwaysDropout(nn.Module):
    """Random in eval mode too: no export can match it."""

    def __init__(self, features: int = 4) -> None:
        super().__init__()
        self.proj = nn.Linear(features, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.proj(x), 0.5, training=True)


@torchkeep.capture_config
class Gate(nn.Module):
    """Python control flow on a tensor's value: torch.export cannot capture it."""

    def __init__(self, features: int = 4) -> None:
        super().__init__()
        self.proj = nn.Linear(features, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        if y.sum() > 0:
            return y * 2
        return y


@torchkeep.capture_config
class Block(nn.Module):
    """Puts the gate one level down, where the error must find it."""

    def __init__(self, features: int = 4) -> None:
        super().__init__()
        self.pre = nn.Linear(features, features)
        self.gate = Gate(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.pre(x))
