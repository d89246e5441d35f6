"""The modes the eager reference of an export runs in: eval, and attention off its fast path."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["attention_slow_path", "eval_mode"]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode for the block; each module's own mode restored after."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


@contextlib.contextmanager
def attention_slow_path(model: nn.Module, notes: list[str]) -> Iterator[None]:
    """Run nn.MultiheadAttention and nn.TransformerEncoderLayer on their plain path.

    In eval mode their "fast path" packs padded sequences into nested tensors and returns 0 at
    padded positions, where an exported graph computes values: every export of a padded batch
    would fail verification on positions nothing reads. The plain path computes the same
    values elsewhere.
    """
    kinds = (nn.MultiheadAttention, nn.TransformerEncoderLayer)
    enabled = torch.backends.mha.get_fastpath_enabled()
    if not enabled or not any(isinstance(m, kinds) for m in model.modules()):
        yield
        return
    torch.backends.mha.set_fastpath_enabled(False)
    notes.append(
        "the eager model ran without the attention fast path (torch.backends.mha), which "
        "returns 0 at padded positions where exported graphs compute values"
    )
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)
