"""``map_location`` and ``dtype`` handling shared by every reader, with torch.load's semantics."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

import torch

from torchkeep.errors import InvalidArgumentError

MapLocation: TypeAlias = str | torch.device | Mapping[str, str] | Callable[[Any, str], Any] | None


def target_device(location: str, map_location: MapLocation) -> str:
    """Where a tensor saved on ``location`` goes under ``map_location`` (not for callables)."""
    if map_location is None:
        return location
    if isinstance(map_location, str | torch.device):
        return str(map_location)
    if isinstance(map_location, Mapping):
        return str(map_location.get(location, location))
    raise TypeError("callable map_location has no fixed target")


def relocate(
    t: torch.Tensor, location: str, map_location: MapLocation, *, key: str, path: str | None
) -> torch.Tensor:
    """Move ``t`` (saved on device ``location``) as ``torch.load(map_location=...)`` would."""
    try:
        if callable(map_location) and not isinstance(map_location, Mapping):
            own = t if t.storage_offset() == 0 and t.is_contiguous() else t.contiguous().clone()
            if own.untyped_storage().nbytes() != own.numel() * own.element_size():
                own = own.clone()
            result = map_location(own.untyped_storage(), location)
            if result is None:
                return relocate(own, location, None, key=key, path=path)
            storage: Any = getattr(result, "_untyped_storage", result)
            return torch.empty(0, dtype=t.dtype, device=storage.device).set_(
                storage, 0, own.shape, own.stride()
            )
        target = torch.device(target_device(location, map_location))
        if target == t.device or (target.type == t.device.type == "cpu"):
            return t
        return t.to(target)
    except (RuntimeError, AssertionError, ValueError) as exc:
        raise InvalidArgumentError(
            f"cannot place tensor {key!r} (saved on {location}): {exc}",
            path=path,
            key=key,
            hint="pass map_location='cpu', or a device this machine has",
        ) from exc


def cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Cast floating-point tensors to ``dtype``; integer, bool and complex tensors are kept."""
    if dtype is None or not t.is_floating_point() or t.dtype == dtype:
        return t
    out = t.detach().to(dtype)
    if isinstance(t, torch.nn.Parameter):
        return torch.nn.Parameter(out, requires_grad=t.requires_grad)
    return out.requires_grad_(t.requires_grad) if t.requires_grad else out


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor of a nested structure, once per tensor object (ties kept)."""
    seen: dict[int, torch.Tensor] = {}

    def walk(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            if id(x) not in seen:
                seen[id(x)] = fn(x)
            return seen[id(x)]
        if isinstance(x, dict):
            out: dict[Any, Any] = OrderedDict() if isinstance(x, OrderedDict) else {}
            for k, v in x.items():
                out[k] = walk(v)
            if hasattr(x, "_metadata"):
                out._metadata = x._metadata  # type: ignore[attr-defined]  # torch's state-dict _metadata
            return out
        if isinstance(x, list | tuple) and type(x) in (list, tuple):
            return type(x)(walk(v) for v in x)
        return x

    return walk(obj)
