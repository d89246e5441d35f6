"""Freezing parameters by name for fine-tuning, and optimizer groups of what still trains."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from torchkeep.errors import InvalidArgumentError


def _patterns(patterns: str | Iterable[str] | None) -> list[str] | None:
    if patterns is None:
        return None
    return [patterns] if isinstance(patterns, str) else list(patterns)


def _select(model: nn.Module, patterns: list[str] | None) -> list[str]:
    names = [name for name, _ in model.named_parameters()]
    if patterns is None:
        return names
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise InvalidArgumentError(
                f"pattern {pattern!r} matches no parameter of {type(model).__name__}",
                key=pattern,
                hint=f"patterns are globs over parameter names such as: {shown}",
            )
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def _set(model: nn.Module, names: list[str], requires_grad: bool) -> list[str]:
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(requires_grad)
    return names


def freeze(model: nn.Module, patterns: str | Iterable[str] | None = None) -> list[str]:
    """Stop training the parameters whose names match a glob (``"backbone.*"``, ``"0.*"``).

    Args:
        model: the model.
        patterns: one glob or several; ``None`` freezes every parameter.

    Returns:
        The names of the parameters frozen.

    Raises:
        InvalidArgumentError: a pattern matches no parameter (a typo would otherwise train
            everything).
    """
    return _set(model, _select(model, _patterns(patterns)), False)


def unfreeze(model: nn.Module, patterns: str | Iterable[str] | None = None) -> list[str]:
    """Train again the parameters whose names match (all of them when ``patterns`` is None)."""
    return _set(model, _select(model, _patterns(patterns)), True)


def trainable_param_groups(
    model: nn.Module,
    lrs: Mapping[str, float] | None = None,
    **defaults: Any,
) -> list[dict[str, Any]]:
    """Optimizer param groups holding only the trainable parameters.

    Args:
        model: the model, some of whose parameters may be frozen.
        lrs: glob -> learning rate; each parameter goes to the group of the first glob it
            matches, the rest to a last group without its own ``lr``.
        **defaults: settings for every group (``weight_decay=0.01``); an ``lr`` here applies to
            the parameters no glob matches, the globs' own rates win over it.

    Returns:
        Groups for ``torch.optim.*(groups, lr=...)``; each also lists its parameter ``names``.

    Example:
        >>> freeze(model, "backbone.*")
        >>> opt = torch.optim.AdamW(trainable_param_groups(model, {"head.*": 1e-3}), lr=1e-4)
    """
    rules = list((lrs or {}).items())
    groups: list[dict[str, Any]] = [
        {**defaults, "params": [], "names": [], "lr": lr} for _, lr in rules
    ]
    rest: dict[str, Any] = {**defaults, "params": [], "names": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        index = next((i for i, (p, _) in enumerate(rules) if fnmatch.fnmatchcase(name, p)), None)
        group = rest if index is None else groups[index]
        group["params"].append(param)
        group["names"].append(name)
    for (pattern, _), group in zip(rules, groups, strict=True):
        if not group["params"]:
            raise InvalidArgumentError(
                f"learning-rate pattern {pattern!r} matches no trainable parameter",
                key=pattern,
                hint="check the glob, and that those parameters are not frozen",
            )
    return [g for g in [*groups, rest] if g["params"]]
