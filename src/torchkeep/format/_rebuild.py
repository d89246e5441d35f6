"""Rebuild a saved tree from its skeleton and stored tensors: placement, views, ties, casts.

Shared by single torchkeep files (:class:`._artifact.SafetensorsFile`) and runs: each stored
tensor is fetched once per device, placed per ``map_location``, and the views recorded in the
skeleton are rebuilt on their placed base (their offsets, shapes and strides checked against it)
so that aliasing survives.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch

from torchkeep.errors import CorruptCheckpointError
from torchkeep.format._dtypes import shape_numel, tensor_dtype_from_name
from torchkeep.format._location import MapLocation, cast, relocate
from torchkeep.format._unflatten import unflatten

__all__ = ["rebuild"]


def rebuild(
    skeleton: Any,
    fetch: Callable[[str], torch.Tensor],
    *,
    map_location: MapLocation = None,
    dtype: torch.dtype | None = None,
    source: str | None = None,
    ready: Callable[[torch.Tensor], None] | None = None,
) -> Any:
    """Rebuild the tree of ``skeleton`` with the stored tensors that ``fetch(key)`` returns.

    Places each tensor per ``map_location``, rebuilds views on their (placed) base so that
    aliasing survives, casts floating tensors to ``dtype``, and returns one object per tied tensor.
    ``ready(base)``, for tensors fetched without their bytes (``_deferred.py``), is called before
    anything here reads a base's bytes (a copy to align it, to move it off the CPU, or to cast it).
    """
    bases: dict[tuple[str, str], torch.Tensor] = {}
    done: dict[str, torch.Tensor] = {}

    def tensor_for(node: dict[str, Any]) -> torch.Tensor:
        key, location, view = str(node.get("k")), str(node.get("dev", "cpu")), node.get("view")
        if view is None and "view" in node:  # the writer omits "view" for a whole tensor
            raise CorruptCheckpointError(
                f"tensor node {key!r} has a null view",
                path=source,
                key=key,
                hint="the file was altered or written by another tool; restore it from a copy",
            )
        ident = json.dumps([key, location, view, node.get("param"), node.get("rg")])
        if ident in done:
            return done[ident]
        if (key, location) not in bases:
            base = fetch(key)
            moves = location != "cpu" or map_location not in (None, "cpu") or dtype is not None
            if ready is not None and (moves or (view is not None and base.data_ptr() % 16)):
                ready(base)
            if view is not None and base.data_ptr() % 16:
                base = base.clone()  # views of any dtype need an aligned base
            bases[(key, location)] = relocate(base, location, map_location, key=key, path=source)
        t = bases[(key, location)]
        if view is not None:
            t = _view_of(t, view, key=key, path=source)
        t = cast(t, dtype)
        if node.get("param"):
            t = torch.nn.Parameter(t, requires_grad=bool(node.get("rg", True)))
        elif node.get("rg") and (t.is_floating_point() or t.is_complex()):
            t = t.requires_grad_(True)
        done[ident] = t
        return t

    return unflatten(skeleton, tensor_for, source=source)


def _view_of(base: torch.Tensor, view: Any, *, key: str, path: str | None) -> torch.Tensor:
    """Rebuild a view recorded as byte offset, shape, stride and dtype within ``base``."""
    try:
        offset, shape, stride = view["offset"], view["shape"], view["stride"]
        dtype = tensor_dtype_from_name(view["dtype"], path=path, key=key)
        ok = (
            type(offset) is int
            and shape_numel(shape) is not None
            and isinstance(stride, list)
            and len(shape) == len(stride)
            and all(type(st) is int and 0 <= st < 1 << 63 for st in stride)
        )
    except CorruptCheckpointError:
        raise  # the dtype's own message says more than "bad view"
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok or offset < 0 or offset % dtype.itemsize:
        raise CorruptCheckpointError(f"bad view of tensor {key!r}: {view!r}", path=path, key=key)
    extent = 0
    if all(shape):
        extent = (
            sum((s - 1) * st for s, st in zip(shape, stride, strict=True)) + 1
        ) * dtype.itemsize
    base_bytes = base.numel() * base.element_size()
    if offset + extent > base_bytes:
        raise CorruptCheckpointError(
            f"a view of tensor {key!r} reaches past its {base_bytes} bytes", path=path, key=key
        )
    start = base.storage_offset() * base.element_size() + offset
    # Bytes first, then the view's dtype: torch.empty(dtype=complex32) would warn that the
    # dtype is experimental (an error under -W error) though nothing is allocated here.
    raw = torch.empty(0, dtype=torch.uint8, device=base.device).set_(base.untyped_storage())
    if start % dtype.itemsize:  # between two elements of the view's dtype: a copy of its bytes
        raw, start = raw[start : start + extent].clone(), 0
    usable = raw.numel() - raw.numel() % dtype.itemsize
    return raw[:usable].view(dtype).as_strided(shape, stride, start // dtype.itemsize)
