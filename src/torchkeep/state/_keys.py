"""Matching a checkpoint's keys to a module's: wrapper prefixes and explicit rename rules.

State dicts saved from wrapped models carry the wrapper's prefix: ``module.`` (DataParallel,
DistributedDataParallel), ``_orig_mod.`` (``torch.compile``), ``model.`` or another attribute
name (a LightningModule holding the network as ``self.model``), ``_forward_module.`` (Fabric).
:func:`adapt_keys` removes such a prefix from the checkpoint, or adds it when the target is the
wrapped one, but only when that is unambiguous: every key of the side concerned carries it, and the
change makes strictly more keys match. Explicit ``rename`` rules (regular expression ->
replacement, applied to the checkpoint's keys in order) run first, for everything else.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from torchkeep.errors import IncompatibleStateError, TorchkeepError

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_forward_module.", "model.")
_MAX_ROUNDS = 4


def _common_first_component(keys: Iterable[str]) -> str | None:
    firsts = {k.split(".", 1)[0] + "." if "." in k else None for k in keys}
    if len(firsts) == 1:
        (only,) = firsts
        return only
    return None


def _candidates(source: set[str], target: set[str]) -> list[tuple[str, str]]:
    """Prefix moves worth trying: ("strip", p) on the checkpoint or ("add", p) to it."""
    moves: list[tuple[str, str]] = []
    for side, keys in (("strip", source), ("add", target)):
        prefixes = [p for p in WRAPPER_PREFIXES if keys and all(k.startswith(p) for k in keys)]
        common = _common_first_component(keys)
        if common is not None and common not in prefixes:
            prefixes.append(common)
        moves += [(side, p) for p in prefixes]
    return moves


def _apply_move(keys: list[str], move: tuple[str, str]) -> list[str]:
    side, prefix = move
    if side == "strip":
        return [k[len(prefix) :] if k.startswith(prefix) else k for k in keys]
    return [prefix + k for k in keys]


def adapt_keys(
    source_keys: Iterable[str],
    target_keys: Iterable[str],
    rename: Mapping[str, str] | None = None,
    *,
    path: str | None = None,
) -> tuple[dict[str, str], tuple[str, ...]]:
    """Map each checkpoint key to the key it should load into.

    Args:
        source_keys: the checkpoint's keys.
        target_keys: the module's keys.
        rename: regular expression -> replacement, applied in order with ``re.sub``.
        path: the checkpoint, for error messages.

    Returns:
        ``{source_key: new_key}`` for every source key, and what was done, one line per change
        (``"rename '^fc\\.' -> 'head.' (2 keys)"``, ``"stripped prefix 'module.' (DDP)"``).

    Raises:
        TorchkeepError: a rename pattern is not a valid regular expression.
        IncompatibleStateError: two checkpoint keys end up with the same name.
    """
    original = list(source_keys)
    target = set(target_keys)
    keys = list(original)
    notes: list[str] = []
    for pattern, replacement in (rename or {}).items():
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise TorchkeepError(
                f"invalid rename pattern {pattern!r}: {exc}",
                hint="rename takes regular expressions",
            ) from exc
        renamed = [regex.sub(replacement, k) for k in keys]
        changed = sum(a != b for a, b in zip(keys, renamed, strict=True))
        notes.append(f"rename {pattern!r} -> {replacement!r} ({changed} keys)")
        keys = renamed
    for _ in range(_MAX_ROUNDS):
        matched = len(target.intersection(keys))
        if matched == len(target) and matched == len(set(keys)):
            break
        best: tuple[int, tuple[str, str], list[str]] | None = None
        for move in _candidates(set(keys), target):
            moved = _apply_move(keys, move)
            score = len(target.intersection(moved))
            if score > matched and (best is None or score > best[0]):
                best = (score, move, moved)
        if best is None:
            break
        _, (side, prefix), keys = best
        what = "stripped prefix" if side == "strip" else "added prefix"
        notes.append(f"{what} {prefix!r}{_origin(prefix)}")
    mapping = dict(zip(original, keys, strict=True))
    seen: dict[str, str] = {}
    for old, new in mapping.items():
        if new in seen:
            raise IncompatibleStateError(
                f"checkpoint keys {seen[new]!r} and {old!r} both become {new!r}",
                path=path,
                key=new,
                hint="make the rename rules more specific",
            )
        seen[new] = old
    return mapping, tuple(notes)


def _origin(prefix: str) -> str:
    return {
        "module.": " (DataParallel/DDP)",
        "_orig_mod.": " (torch.compile)",
        "_forward_module.": " (Lightning Fabric)",
        "model.": " (LightningModule attribute)",
    }.get(prefix, "")


def renamed_state(state: Mapping[str, Any], mapping: Mapping[str, str]) -> dict[str, Any]:
    """``state`` with its keys renamed by ``mapping`` (order kept, metadata dropped)."""
    return {mapping.get(k, k): v for k, v in state.items()}


def unwrap_module(module: nn.Module) -> nn.Module:
    """The model inside torch's wrappers: ``.module`` of DataParallel/DDP, ``._orig_mod`` of
    ``torch.compile`` (nested wrappers too); any other module is returned as it is."""
    for _ in range(_MAX_ROUNDS):
        inner: object = None
        if isinstance(module, nn.DataParallel | nn.parallel.DistributedDataParallel):
            inner = module.module
        elif type(module).__name__ == "OptimizedModule":  # torch.compile, without importing dynamo
            inner = module._modules.get("_orig_mod")
        if not isinstance(inner, nn.Module):
            break
        module = inner
    return module
