"""The model, data and training epoch of ``torchkeep demo``.

The model lives in an importable module of its own so that :func:`torchkeep.save_model` can
record its import path (``torchkeep.cli._demo_model.DemoMLP``) and :func:`torchkeep.load_model`
can rebuild it from JSON-able constructor arguments, in another process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import torchkeep as tk

__all__ = ["DemoData", "DemoMLP", "make_data", "predict", "train_epoch"]


@tk.capture_config  # a CheckpointManager run records the class, so RUN@best rebuilds it
class DemoMLP(nn.Module):
    """A small classifier with every kind of state a checkpoint must carry.

    Linear weights and biases, BatchNorm running statistics and its ``int64`` batch counter
    (buffers), LayerNorm affine parameters, and Dropout, which makes train and eval mode
    differ (so a reloaded model must be put in eval mode to predict the same).

    Args:
        in_features: inputs per sample.
        hidden: width of the two hidden layers.
        out_features: number of classes.
        dropout: dropout probability after the first hidden layer.
    """

    def __init__(
        self, in_features: int = 16, hidden: int = 64, out_features: int = 4, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.hidden = hidden
        self.out_features = out_features
        self.dropout = dropout
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.LayerNorm(hidden),
            nn.ReLU(),
            nn.Linear(hidden, out_features),
        )

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments, JSON-able: ``DemoMLP(**model.config)`` is the same model."""
        return {
            "in_features": self.in_features,
            "hidden": self.hidden,
            "out_features": self.out_features,
            "dropout": self.dropout,
        }

    def forward(self, x: Tensor) -> Tensor:
        """Class logits for a batch ``(N, in_features)``."""
        out: Tensor = self.net(x)
        return out


@dataclass(frozen=True, slots=True)
class DemoData:
    """A synthetic classification dataset, split into train and validation."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor

    @property
    def in_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max().item(), self.y_val.max().item())) + 1


def make_data(
    seed: int,
    *,
    n_train: int = 1024,
    n_val: int = 256,
    in_features: int = 16,
    num_classes: int = 4,
) -> DemoData:
    """Gaussian inputs labelled by a random two-layer "teacher" network plus noise.

    Everything is drawn from one ``torch.Generator`` seeded with ``seed``: the same seed gives
    the same tensors on every machine, without touching the global RNG.

    Args:
        seed: the generator's seed.
        n_train: training samples.
        n_val: validation samples.
        in_features: features per sample.
        num_classes: classes.

    Returns:
        The dataset (``float32`` inputs, ``int64`` labels).
    """
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(in_features, 32, generator=g)
    w2 = torch.randn(32, num_classes, generator=g)
    x = torch.randn(n_train + n_val, in_features, generator=g)
    logits = torch.tanh(x @ w1 / in_features**0.5) @ w2
    logits = logits + 0.3 * torch.randn(logits.shape, generator=g)
    y = logits.argmax(dim=1)
    return DemoData(x_train=x[:n_train], y_train=y[:n_train], x_val=x[n_train:], y_val=y[n_train:])


def predict(model: nn.Module, x: Tensor) -> Tensor:
    """``model(x)`` in eval mode, without autograd."""
    model.eval()
    with torch.no_grad():
        out: Tensor = model(x)
    return out


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: DemoData,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    on_batch: Callable[[], None] | None = None,
) -> tuple[float, float, float]:
    """One epoch of cross-entropy training on shuffled batches, then validation.

    Args:
        model: the model, put in train mode for the epoch and in eval mode after it.
        optimizer: steps after every batch.
        data: the dataset.
        batch_size: samples per batch (the last batch may be smaller).
        generator: draws the shuffle order. ``None``: torch's global generator, which also
            draws the dropout masks and which ``tk.RNGState`` saves and restores.
        on_batch: called after every batch (a progress bar advances).

    Returns:
        The mean training loss, the validation loss and the validation accuracy.
    """
    order = torch.randperm(len(data.x_train), generator=generator)
    model.train()
    total = 0.0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        torch.autograd.backward(loss)  # typed, unlike Tensor.backward
        optimizer.step()
        total += loss.item() * len(idx)
        if on_batch is not None:
            on_batch()
    logits = predict(model, data.x_val)
    val_loss = nn.functional.cross_entropy(logits, data.y_val).item()
    accuracy = (logits.argmax(dim=1) == data.y_val).float().mean().item()
    return total / len(order), val_loss, accuracy
