"""Matching a checkpoint's keys to a module's: wrapper prefixes and explicit rename rules.

State dicts saved from wrapped models carry the wrapper's prefix: ``module.`` (DataParallel,
DistributedDataParallel), ``_orig_mod.`` (``torch.compile``), ``model.`` or another attribute
name (a LightningModule holding the network as ``self.model``), ``_forward_module.`` (Fabric).
:func:`adapt_keys` removes such a prefix from the checkpoint, or adds it when the target is the
wrapped one, but only when that is unambiguous: every key of the side concerned carries it, and the
change makes strictly more keys match. Wrappers stack (``module._orig_mod.``, ``model.module.``),
and a checkpoint of one wrapper may go into another (strip ``_orig_mod.``, add ``module.``).
When nothing matches at all, :func:`no_match_hint` names the closest prefixes. Explicit ``rename`` rules (regular expression ->
replacement, applied to the checkpoint's keys in order) run first, for everything else.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from torchkeep.errors import IncompatibleStateError, InvalidArgumentError

_ORIGINS = {
    "module.": "DataParallel/DDP",
    "_orig_mod.": "torch.compile",
    "_forward_module.": "Lightning Fabric",
    "model.": "LightningModule attribute",
}
WRAPPER_PREFIXES = tuple(_ORIGINS)


_MAX_ROUNDS = 4  # wrapper prefixes stacked deeper than this are not looked for
_AMBIGUOUS = 8  # a key tail shared by more names than this (``weight``) says nothing of prefixes


def _common_components(keys: Iterable[str], limit: int = _MAX_ROUNDS) -> list[str]:
    """The leading dotted components every key shares (``["module.", "_orig_mod."]``).

    Each key keeps at least one component of its own, so a single key ``fc.weight`` gives
    ``["fc."]`` and never the whole name.
    """
    keys = list(keys)
    if not keys:
        return []
    parts = [k.split(".") for k in keys]
    shortest = min(len(p) for p in parts) - 1
    common: list[str] = []
    for i in range(min(shortest, limit)):
        first = parts[0][i]
        if any(p[i] != first for p in parts):
            break
        common.append(first + ".")
    return common


def _best_move(keys: list[str], target: set[str]) -> tuple[str, str, list[str]] | None:
    """The prefix change that makes the most keys match: strip ``s`` from every key, add ``a``.

    Wrappers stack (``module._orig_mod.`` from DDP over ``torch.compile``; an ``_orig_mod.``
    checkpoint for a DataParallel model needs ``_orig_mod.`` stripped and ``module.`` added), so
    every depth of the checkpoint's common prefix is tried against every depth of the module's.
    Only a change that matches strictly more keys than none counts; ties go to the smallest.
    At most one changed component may be other than a known wrapper name: one (a network kept
    as ``self.net``, under DDP or not) is unambiguous, ``encoder.`` -> ``backbone.`` a guess.
    """
    matched = len(target.intersection(keys))
    source_stack = _common_components(keys)
    target_stack = _common_components(target)
    best: tuple[int, int, str, str, list[str]] | None = None
    for i in range(len(source_stack) + 1):
        strip = "".join(source_stack[:i])
        for j in range(len(target_stack) + 1):
            if i == j == 0:
                continue
            changed = source_stack[:i] + target_stack[:j]
            if sum(c not in _ORIGINS for c in changed) > 1:
                continue
            add = "".join(target_stack[:j])
            moved = [add + k[len(strip) :] for k in keys]
            score = len(target.intersection(moved))
            if score > matched and (best is None or (score, -(i + j)) > (best[0], -best[1])):
                best = (score, i + j, strip, add, moved)
    return None if best is None else (best[2], best[3], best[4])


def _describe(prefix: str) -> str:
    """``'module._orig_mod.' (DataParallel/DDP, torch.compile)``."""
    origins = [_ORIGINS[p] for p in _split(prefix) if p in _ORIGINS]
    return f"{prefix!r}" + (f" ({', '.join(origins)})" if origins else "")


def _split(prefix: str) -> list[str]:
    return [c + "." for c in prefix.split(".")[:-1]]


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
        (``"rename '^fc\\.' -> 'head.' (2 keys)"``,
        ``"stripped prefix 'module.' (DataParallel/DDP)"``).

    Raises:
        InvalidArgumentError: a rename pattern is not a valid regular expression.
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
            raise InvalidArgumentError(
                f"invalid rename pattern {pattern!r}: {exc}",
                hint="rename takes regular expressions",
            ) from exc
        renamed = [regex.sub(replacement, k) for k in keys]
        changed = sum(a != b for a, b in zip(keys, renamed, strict=True))
        notes.append(f"rename {pattern!r} -> {replacement!r} ({changed} keys)")
        keys = renamed
    matched = len(target.intersection(keys))
    if not (matched == len(target) and matched == len(set(keys))):
        move = _best_move(keys, target)
        if move is not None:
            strip, add, keys = move
            if strip:
                notes.append(f"stripped prefix {_describe(strip)}")
            if add:
                notes.append(f"added prefix {_describe(add)}")
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


def closest_prefixes(
    source_keys: Iterable[str], target_keys: Iterable[str]
) -> tuple[str, str, int, tuple[str, str]] | None:
    """The prefix pair that would make the most checkpoint keys match the module's.

    Looks for ``(a, b)`` such that many checkpoint keys ``a + tail`` have a module key
    ``b + tail`` (``encoder.`` vs ``backbone.``). Tails shared by many names (``weight``) are
    skipped: they would pair every prefix with every other.

    Returns:
        ``(a, b, count, (example checkpoint key, example module key))``, or ``None`` when no
        key tail is shared at all.
    """
    heads: dict[str, set[str]] = {}
    for t in target_keys:
        parts = t.split(".")
        for i in range(len(parts)):
            heads.setdefault(".".join(parts[i:]), set()).add("".join(p + "." for p in parts[:i]))
    counts: dict[tuple[str, str], list[Any]] = {}
    for k in source_keys:
        parts = k.split(".")
        for i in range(len(parts)):
            tail = ".".join(parts[i:])
            found = heads.get(tail, set())
            if not found or len(found) > _AMBIGUOUS:
                continue
            a = "".join(p + "." for p in parts[:i])
            for b in found:
                if a != b:
                    entry = counts.setdefault((a, b), [0, (k, b + tail)])
                    entry[0] += 1
            break  # the longest shared tail decides this key's prefixes
    if not counts:
        return None
    (a, b), (count, example) = max(
        counts.items(), key=lambda item: (item[1][0], -len(item[0][0]) - len(item[0][1]))
    )
    return a, b, count, example


def no_match_hint(source_keys: Iterable[str], target_keys: Iterable[str]) -> str:
    """How to make a checkpoint whose keys match none of a module's load into it."""
    source, target = list(source_keys), list(target_keys)
    found = closest_prefixes(source, target)
    if found is not None:
        a, b, count, (ck, mk) = found
        pattern = "^" + re.escape(a)
        return (
            f"the closest prefix: checkpoint keys start with {a!r} where the module's start "
            f"with {b!r} ({count} keys, e.g. {ck!r} vs {mk!r}); pass rename={{{pattern!r}: {b!r}}}"
        )
    shown_source = ", ".join(map(repr, source[:2])) or "none"
    shown_target = ", ".join(map(repr, target[:2])) or "none"
    return (
        f"no prefix change aligns the checkpoint's keys ({shown_source}, ...) with the "
        f"module's ({shown_target}, ...): is it the checkpoint of another model? rename= "
        "(regular expression -> replacement) can map them"
    )


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
