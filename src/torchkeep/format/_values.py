"""What ``inspect`` says about a checkpoint beyond its tensors: plain values and which tensors
are optimizer state.

A training checkpoint is more than weights: ``{"epoch": 3, "loss": 0.25, "model": {...},
"optimizer": {...}}``, a Lightning file's ``hyper_parameters``. :func:`plain_values` lists the
plain values (numbers, strings, bools, None, short lists of them) near the top of the structure,
where people put them; deeper ones (Lightning's loop progress, RNG internals) are bookkeeping.

An optimizer's state dict (``{"state": {...}, "param_groups": [...]}``) holds as many numbers
as the model again per moment (Adam's ``exp_avg``, ``exp_avg_sq``, ``step``): those are not
parameters. :func:`optimizer_tensor_paths` finds them by that shape, which is torch's for every
``torch.optim`` optimizer, under whatever key the user chose.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["MAX_VALUE_DEPTH", "is_optimizer_state", "optimizer_tensor_paths", "plain_values"]

#: Plain values are listed down to this many keys deep (``hyper_parameters.lr`` is 2).
MAX_VALUE_DEPTH = 2
#: A list of plain values longer than this is summarised, not listed.
_MAX_LIST = 32

_PLAIN = (bool, int, float, str, type(None))


def is_optimizer_state(x: Any) -> bool:
    """True for a ``torch.optim.Optimizer.state_dict()``: ``state`` and ``param_groups`` keys."""
    return isinstance(x, Mapping) and "state" in x and "param_groups" in x


def _children(x: Any) -> list[tuple[str, Any]]:
    if isinstance(x, Mapping):
        return [(str(k), v) for k, v in x.items()]
    if isinstance(x, list | tuple):
        return [(str(i), v) for i, v in enumerate(x)]
    return []


def optimizer_tensor_paths(obj: Any) -> set[str]:
    """Dotted paths (as ``tensors_by_path`` names them) of the tensors inside optimizer states."""
    found: set[str] = set()

    def walk(x: Any, path: tuple[str, ...], inside: bool) -> None:
        inside = inside or is_optimizer_state(x)
        if isinstance(x, torch.Tensor | np.ndarray):
            if inside:
                found.add(".".join(path) or "tensor")
            return
        for key, value in _children(x):
            walk(value, (*path, key), inside)

    walk(obj, (), False)
    return found


def _plain_list(x: Any) -> bool:
    return isinstance(x, list | tuple) and all(isinstance(v, _PLAIN) for v in x)


def plain_values(obj: Any, *, max_depth: int = MAX_VALUE_DEPTH) -> dict[str, Any]:
    """The plain values of a loaded checkpoint by dotted path, in order.

    Args:
        obj: what a reader loaded (nested dicts, lists, tensors, plain values).
        max_depth: how many keys deep to look.

    Returns:
        ``{"epoch": 3, "loss": 0.25, "hyper_parameters.lr": 0.001, "history": [0.5, 0.25]}``:
        numbers, strings, bools and None, and lists of them as one value (a list longer than 32
        as ``"[N values]"``). Tensors, optimizer states and anything deeper are left out.
    """
    out: dict[str, Any] = {}

    def walk(x: Any, path: tuple[str, ...]) -> None:
        if isinstance(x, np.generic) and x.dtype.kind in "biuf":
            x = x.item()
        if isinstance(x, _PLAIN) or _plain_list(x):
            if not path:
                return
            if isinstance(x, list | tuple) and len(x) > _MAX_LIST:
                x = f"[{len(x)} values]"
            out[".".join(path)] = list(x) if isinstance(x, tuple) else x
            return
        if len(path) >= max_depth or is_optimizer_state(x):
            return
        for key, value in _children(x):
            walk(value, (*path, key))

    walk(obj, ())
    return out
