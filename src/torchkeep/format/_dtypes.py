"""Names of dtypes on disk.

safetensors knows a fixed set of dtypes; tensors of any other torch dtype (complex128, the sub-byte
and bit types, float8_e8m0fnu...) are stored as raw ``U8`` bytes and the true dtype and shape go in
torchkeep's own header. Any safetensors reader can still read every tensor; torchkeep restores the
exact dtype.

Only the dtypes of :data:`VIEWABLE_DTYPES` are ever built from a file's bytes. A quantized dtype
(``qint8``, ``quint4x2``...) needs a scale and zero point that raw bytes do not carry, and
``torch.frombuffer`` with one kills the interpreter (SIGSEGV) instead of raising: a crafted header
naming one must be refused before any tensor is made. The list is explicit, not "everything but
the quantized ones", so that a dtype a future torch adds is refused until it has been checked.
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

# Every dtype that torch.frombuffer, reshape, view(torch.uint8) and clone handle (checked one by
# one in a subprocess on torch 2.13); names a given torch lacks are skipped.
_VIEWABLE_NAMES = (
    ["bool", "uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64"]
    + ["float16", "bfloat16", "float32", "float64", "complex32", "complex64", "complex128"]
    + ["float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"]
    + ["float4_e2m1fn_x2", "bits8", "bits16", "bits1x8", "bits2x4", "bits4x2"]
    + [f"{sign}int{bits}" for sign in ("", "u") for bits in range(1, 8)]
)
VIEWABLE_DTYPES: frozenset[torch.dtype] = frozenset(
    value
    for name in _VIEWABLE_NAMES
    if isinstance(value := getattr(torch, name, None), torch.dtype)
)
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


def tensor_dtype_from_name(
    name: str, *, path: str | None = None, key: str | None = None
) -> torch.dtype:
    """The dtype of a tensor to build from a file's bytes: only one of :data:`VIEWABLE_DTYPES`.

    Raises:
        CorruptCheckpointError: ``name`` is unknown, or a dtype (quantized...) that cannot be
            built from raw bytes; torchkeep never writes one.
    """
    dtype = dtype_from_name(name, path=path)
    if dtype not in VIEWABLE_DTYPES:
        raise CorruptCheckpointError(
            f"tensor {key!r} declares dtype {dtype_name(dtype)}, which cannot be built from raw "
            "bytes (torchkeep never writes one)",
            path=path,
            key=key,
            hint="the header was altered or written by another tool; do not load this file",
        )
    return dtype


MAX_DIMS = 1024  # far beyond any real tensor; bounds the work of checking a crafted shape
_MAX_EXTENT = 1 << 63  # torch's sizes and byte counts are int64


def shape_numel(shape: object) -> int | None:
    """The element count of a shape read from a file, or ``None`` when it is no valid shape.

    A valid shape is a list (or tuple) of at most :data:`MAX_DIMS` ints (not bools), each in
    ``[0, 2**63)``, whose product (of the non-zero ones) fits in an int64. The product stops early, so that a crafted
    shape of a million huge dims costs no more than a glance.
    """
    if not isinstance(shape, list | tuple) or len(shape) > MAX_DIMS:
        return None
    if not all(type(s) is int and 0 <= s < _MAX_EXTENT for s in shape):
        return None
    extent = 1  # the product of the dims other than 0: torch checks that it fits in an int64 too
    for s in shape:
        extent *= max(s, 1)
        if extent >= _MAX_EXTENT:
            return None
    return 0 if 0 in shape else extent
