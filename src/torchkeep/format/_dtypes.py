"""Names of dtypes on disk.

safetensors knows a fixed set of dtypes; tensors of any other torch dtype (complex128, the sub-byte
and bit types, float8_e8m0fnu...) are stored as raw ``U8`` bytes and the true dtype and shape go in
torchkeep's own header. Any safetensors reader can still read every tensor; torchkeep restores the
exact dtype.
"""

from __future__ import annotations

import torch

from torchkeep.errors import CorruptCheckpointError

# The dtypes every safetensors reader since 0.4 understands, plus the float8 and unsigned ones
# safetensors' Python bindings map to torch today.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "U64": torch.uint64,
    "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
}
TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}

_ALL_TORCH_DTYPES: dict[str, torch.dtype] = {
    name: value for name in dir(torch) if isinstance(value := getattr(torch, name), torch.dtype)
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (the canonical name, never an alias like ``float``)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str, *, path: str | None = None) -> torch.dtype:
    """The torch dtype called ``name`` (``"float32"``, ``"torch.float32"``)."""
    dtype = _ALL_TORCH_DTYPES.get(name.removeprefix("torch.")) if isinstance(name, str) else None
    if dtype is None:
        raise CorruptCheckpointError(
            f"unknown dtype {name!r}",
            path=path,
            hint="the file may come from a newer torch; upgrade torch and torchkeep",
        )
    return dtype
