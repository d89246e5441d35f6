"""Models the export tests export: importable, so that save_model can rebuild them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import torchkeep


@torchkeep.capture_config
class SmallCNN(nn.Module):
    """Convolutions with BatchNorm and dropout: eval mode must be what gets exported."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(16)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.head(self.drop(x.mean(dim=(2, 3))))


@torchkeep.capture_config
class MLP(nn.Module):
    def __init__(self, features: int = 12, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(features, hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(hidden, 3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.heads, d // self.heads)
        q, k, v = (
            qkv[:, :, 0].transpose(1, 2),
            qkv[:, :, 1].transpose(1, 2),
            qkv[:, :, 2].transpose(1, 2),
        )
        keep = mask[:, None, None, :] != 0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


@torchkeep.capture_config
class TransformerBlock(nn.Module):
    """Embedding, masked self-attention and LayerNorm; two outputs in a dict."""

    def __init__(self, vocab: int = 40, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(0.2)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        x = self.embed(input_ids)
        x = x + self.drop(self.attn(self.ln1(x), attention_mask))
        x = x + self.drop(self.ff(self.ln2(x)))
        weights = attention_mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return {"hidden": x, "pooled": pooled}


class Gate(nn.Module):
    """Python control flow on a tensor's value: torch.export cannot capture it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x


class InvertMask(nn.Module):
    """``1.0 - int_mask``: the ONNX exporter of torch 2.13 fails on it in its step 2."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * (1.0 - mask)


class Wrapper(nn.Module):
    """Puts the failing module one level down, where the error must find it."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.pre = nn.Identity()
        self.inner = inner

    def forward(self, x: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        return self.inner(self.pre(x), *rest)


class AlwaysDropout(nn.Module):
    """Random in eval mode too: no export can match it."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.proj(x), 0.5, training=True)


class FixedBatch(nn.Module):
    """Hard-codes the batch size of 2."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.reshape(2, 8))
