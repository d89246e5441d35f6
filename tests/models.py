"""Tiny purpose-built models, each encoding one edge case of saving and loading.

They live in an importable module (``tests.models``) so that ``save_model``/``load_model`` and
``torch.save(model)`` can refer to them by import path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import torchkeep

__all__ = [
    "BNNet",
    "CapturedNet",
    "ExtraStateNet",
    "MixinNet",
    "MixinNoInit",
    "MixinSub",
    "MLP",
    "NonPersistentBufferNet",
    "NotAModule",
    "Opaque",
    "StarArgsNet",
    "TiedLM",
    "TransposedWeight",
    "TwoHeads",
    "fill_",
]


def fill_(module: nn.Module, seed: int) -> nn.Module:
    """Give every parameter and floating buffer of ``module`` values derived from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in module.parameters():
            t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype))
        for t in module.buffers():  # positive: running variances must stay variances
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g, dtype=torch.float64).to(t.dtype) + 0.5)
    return module


class MLP(nn.Module):
    """The plainest model: two linear layers. Built with explicit arguments, no capture."""

    def __init__(self, d_in: int = 4, hidden: int = 8, d_out: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class TiedLM(nn.Module):
    """Tied embedding and output weights: ``self.out.weight = self.emb.weight``."""

    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(ids))


class TransposedWeight(nn.Module):
    """A parameter that is a transposed, hence non-contiguous, view."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 3).t())  # shape (3, 5), stride (1, 3)
        self.b = nn.Parameter(torch.randn(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w + self.b


class BNNet(nn.Module):
    """BatchNorm: running stats buffers and an int64 ``num_batches_tracked``; Dropout."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.bn = nn.BatchNorm1d(d)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.bn(self.fc(x)))


class NonPersistentBufferNet(nn.Module):
    """A persistent buffer and a non-persistent one (never in the state dict)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.register_buffer("steps", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("scratch", torch.full((4,), 7.0), persistent=False)


class ExtraStateNet(nn.Module):
    """A module with extra (non-tensor) state through get/set_extra_state."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.counter = 0
        self.tag = "new"

    def get_extra_state(self) -> Any:
        return {"counter": self.counter, "tag": self.tag}

    def set_extra_state(self, state: Any) -> None:
        self.counter = state["counter"]
        self.tag = state["tag"]


class TwoHeads(nn.Module):
    """Shares its ``body`` keys with MLP-like checkpoints; a head whose size varies."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.head = nn.Linear(6, classes)


@torchkeep.capture_config
class CapturedNet(nn.Module):
    """Constructor arguments recorded by the decorator (defaults included)."""

    def __init__(self, d_in: int, hidden: int = 5, *, act: str = "relu", widths=(2, 3)) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, sum(widths))
        self.act = act
        self.widths = widths

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = torch.relu(h) if self.act == "relu" else torch.tanh(h)
        return self.fc2(h)


class MixinNet(torchkeep.ConfigMixin, nn.Module):
    """Constructor arguments recorded through the mixin."""

    def __init__(self, d_in: int = 3, d_out: int = 2, **extra: Any) -> None:
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)
        self.extra = extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class MixinSub(MixinNet):
    """A subclass with its own arguments: those, not the parent's, are what rebuild it."""

    def __init__(self, depth: int = 2, d_in: int = 3) -> None:
        super().__init__(d_in=d_in, d_out=depth * 2, flavour="sub")
        self.depth = depth
        self.norm = nn.LayerNorm(depth * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x))


class MixinNoInit(MixinNet):
    """A subclass without an ``__init__``: rebuilt with the parent's arguments."""


@torchkeep.capture_config
class StarArgsNet(nn.Module):
    """Built with positional ``*args``, which cannot be replayed as keyword arguments."""

    def __init__(self, *sizes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(sizes[0], sizes[-1])


class NotAModule:
    """Not an nn.Module; constructing it must never happen from a model description."""

    constructed = False

    def __init__(self, **kwargs: Any) -> None:
        NotAModule.constructed = True


class Opaque:
    """An arbitrary object: only pickle could store it."""

    def __init__(self, value: int = 1) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Opaque) and other.value == self.value

    def __hash__(self) -> int:
        return hash(self.value)


# --- helpers shared by the tests ------------------------------------------------------------


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality of two tensors of the same dtype and shape (NaNs included)."""

    def flat_bytes(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().resolve_conj().resolve_neg().contiguous()
        # size-1 dims may carry any stride: re-stride the dense elements explicitly
        t = torch.as_strided(t, (t.numel(),), (1,), t.storage_offset())
        return t.view(torch.uint8)

    return torch.equal(flat_bytes(a), flat_bytes(b))


def assert_same(expected: Any, actual: Any, where: str = "obj") -> None:
    """Deep equality with exact types: tuples stay tuples, ints stay ints, dtypes and shapes match."""
    import math

    import numpy as np

    assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype, f"{where}: {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{where}: {actual.shape} != {expected.shape}"
        assert actual.device == expected.device, where
        assert actual.requires_grad == expected.requires_grad, where
        assert same_bytes(expected, actual), f"{where}: values differ"
    elif isinstance(expected, np.ndarray):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, where
        assert actual.tobytes() == expected.tobytes(), where
    elif isinstance(expected, dict):
        assert list(actual.keys()) == list(expected.keys()), f"{where}: keys differ"
        for k in expected:
            assert_same(expected[k], actual[k], f"{where}[{k!r}]")
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected), f"{where}: length differs"
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            assert_same(e, a, f"{where}[{i}]")
    elif isinstance(expected, float):
        if math.isnan(expected):
            assert math.isnan(actual), where
        else:
            assert actual == expected, f"{where}: {actual!r} != {expected!r}"
            assert math.copysign(1, actual) == math.copysign(1, expected), where
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def read_st_header(path: Any) -> tuple[dict[str, Any], bytes]:
    """The JSON header of a safetensors file and its data bytes."""
    import json
    import struct
    from pathlib import Path

    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_st(path: Any, header: Any, data: bytes, *, pad: bool = True) -> None:
    """Write a safetensors file from a header (dict or raw bytes) and data, unchecked."""
    import json
    import struct

    separators = None
    if isinstance(header, dict) and isinstance(header.get("__metadata__"), dict):
        # Re-seal as torchkeep's writer would, so that a test reaches the check it aims at.
        from torchkeep.format._artifact import DIGEST_KEY
        from torchkeep.format._safetensors import layout_digest

        meta = header["__metadata__"]
        if DIGEST_KEY in meta:
            entries = {k: v for k, v in header.items() if k != "__metadata__"}
            rest = {k: v for k, v in meta.items() if k != DIGEST_KEY}
            meta[DIGEST_KEY] = layout_digest(entries, rest)
            separators = (",", ":")  # the writer's layout, which sealed headers must keep
    blob = (
        header if isinstance(header, bytes) else json.dumps(header, separators=separators).encode()
    )
    if pad:
        blob += b" " * ((-(8 + len(blob))) % 64)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data)


def rewrite_document(path: Any, edit: Any) -> None:
    """Rewrite the torchkeep JSON document in a torchkeep safetensors file: ``edit(doc)``."""
    import json

    header, data = read_st_header(path)
    doc = json.loads(header["__metadata__"]["torchkeep"])
    edit(doc)
    header["__metadata__"]["torchkeep"] = json.dumps(doc)
    write_st(path, header, data)


def rewrite_manifest(path: Any, edit: Any) -> None:
    """Rewrite a run's manifest with ``edit(doc)`` and seal it again, as torchkeep's writer does,
    so that a test reaches the check it aims at rather than the digest."""
    import json
    from pathlib import Path

    from torchkeep.format import seal_json

    doc = json.loads(Path(path).read_bytes())
    doc.pop("digest", None)
    edit(doc)
    Path(path).write_bytes(seal_json(json.dumps(doc, separators=(",", ":")).encode()))
