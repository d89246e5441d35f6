"""The example inputs of ``torchkeep export``: ``--example-shape``, ``--dtype`` and
``--dynamic-dim`` parsed, and random tensors from a fixed seed.
"""

from __future__ import annotations

from typing import Any

import torch

from torchkeep.cli._errors import fail

__all__ = [
    "DTYPES",
    "SEED",
    "example_inputs",
    "parse_dynamic_dims",
    "parse_shape",
]

#: Names accepted by ``--dtype``.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "float64": torch.float64,
    "double": torch.float64,
    "fp64": torch.float64,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "int64": torch.int64,
    "long": torch.int64,
    "int32": torch.int32,
    "int": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}

#: The seed of the example inputs: the same command exports from the same values.
SEED = 0

# ---------------------------------------------------------------------------------------------
# parsing


def parse_shape(text: str) -> tuple[int, ...]:
    """``"2,3,224,224"`` -> ``(2, 3, 224, 224)``; a usage error for anything else."""
    parts = [p.strip() for p in text.split(",")]
    if text.strip() == "" or not all(p.isascii() and p.isdigit() for p in parts):
        fail(f"--example-shape takes comma-separated sizes like 2,3,224,224, got {text!r}", code=2)
    return tuple(int(p) for p in parts)


def _dtypes(names: list[str], count: int) -> list[torch.dtype]:
    found: list[torch.dtype] = []
    for name in names:
        dtype = DTYPES.get(name.strip().lower().removeprefix("torch."))
        if dtype is None:
            fail(f"unknown --dtype {name!r}; use one of {', '.join(DTYPES)}", code=2)
        found.append(dtype)
    if not found:
        return [torch.float32] * count
    if len(found) == 1:
        return found * count
    if len(found) != count:
        fail(
            f"{len(found)} --dtype for {count} --example-shape: give one --dtype for all "
            "inputs, or one per --example-shape, in the same order",
            code=2,
        )
    return found


def example_inputs(shapes: list[tuple[int, ...]], dtypes: list[torch.dtype]) -> tuple[Any, ...]:
    """One random tensor per shape, from a fixed seed.

    Floating dtypes get standard normal values; integer dtypes and ``bool`` get 0s and 1s, which
    are valid token ids and attention masks.
    """
    g = torch.Generator().manual_seed(SEED)
    tensors: list[torch.Tensor] = []
    for shape, dtype in zip(shapes, dtypes, strict=True):
        if dtype.is_floating_point:
            tensors.append(torch.randn(shape, generator=g, dtype=dtype))
        elif dtype == torch.bool:
            tensors.append(torch.randint(0, 2, shape, generator=g).bool())
        else:
            tensors.append(torch.randint(0, 2, shape, generator=g, dtype=dtype))
    return tuple(tensors)


def parse_dynamic_dims(items: list[str]) -> dict[str | int, dict[int, str]]:
    """``["0:1:seq", "mask:1:seq"]`` -> ``{0: {1: "seq"}, "mask": {1: "seq"}}``."""
    dims: dict[str | int, dict[int, str]] = {}
    for item in items:
        parts = item.split(":")
        ok = len(parts) == 3 and all(parts) and parts[2].isidentifier()
        try:
            dim = int(parts[1]) if ok else 0
        except ValueError:
            ok = False
        if not ok:
            fail(
                f"--dynamic-dim takes INPUT:DIM:NAME (e.g. 0:1:seq or input_ids:1:seq), "
                f"got {item!r}",
                code=2,
            )
        key: str | int = int(parts[0]) if parts[0].isascii() and parts[0].isdigit() else parts[0]
        dims.setdefault(key, {})[dim] = parts[2]
    return dims
