"""Loading a state dict into a module, tensor by tensor, with a report of what happened.

Everything is checked before anything is copied: a load that raises leaves the module untouched.
Tensors are copied one at a time. When the source is a safetensors file and the parameter is a
contiguous CPU tensor of the same dtype, its bytes are read from the file straight into the
parameter's memory (``os.preadv``), so loading needs no second copy of the weights. Otherwise the
mapped source tensor is copied and its pages are released at once.

``load_into`` and ``CheckpointManager.restore`` both go through :func:`prepare` (find the state,
adapt its keys, plan, check) and :func:`copy_into` (apply, reading straight from the file), so
that renames, ties and the memory bound cannot drift apart between them.

Modules that customise loading (``_load_from_state_dict`` overrides other than the norm layers',
load hooks, extra state) are loaded through their own ``load_state_dict`` instead, so their
semantics are kept.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from torchkeep.errors import IncompatibleStateError, TorchkeepError
from torchkeep.format._direct import DirectReads
from torchkeep.state._keys import adapt_keys, no_match_hint, renamed_state
from torchkeep.state._report import LoadReport, Mismatch, Tie

# Names under which checkpoints commonly keep a model's state, tried first when scores tie.
PREFERRED_ENTRIES = ("model_state_dict", "state_dict", "model", "module", "net", "network")
_MAX_ENTRY_DEPTH = 3


def _tensor_items(obj: Mapping[Any, Any]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _overlap(module_keys: set[str], keys: Iterable[str], rename: Mapping[str, str] | None) -> int:
    """Keys that match once wrapper prefixes and rename rules are applied."""
    keys = list(keys)
    try:
        mapping, _ = adapt_keys(keys, module_keys, rename)
    except TorchkeepError:
        return len(module_keys.intersection(keys))
    return len(module_keys.intersection(mapping.values()))


def find_state(
    module_keys: set[str], obj: Any, rename: Mapping[str, str] | None = None
) -> tuple[Mapping[str, Any], str]:
    """Find the state dict for a module in a checkpoint: the whole object or an entry in it.

    The candidate sharing the most keys with the module wins (after wrapper prefixes and rename
    rules); ties go to the candidate with more tensors, then to the top level, then to the usual
    names (``model_state_dict``, ``state_dict``, ``model``...).

    Returns:
        The state dict and its dotted location in ``obj`` (``""`` for the top level).
    """
    if not isinstance(obj, Mapping):
        raise IncompatibleStateError(
            f"the checkpoint holds a {type(obj).__name__}, not a state dict",
            hint="load it with torchkeep.load and pass the state dict you want",
        )
    candidates: list[tuple[str, dict[str, torch.Tensor]]] = []

    def collect(node: Mapping[Any, Any], where: str, depth: int) -> None:
        tensors = _tensor_items(node)
        if tensors:
            candidates.append((where, tensors))
        if depth < _MAX_ENTRY_DEPTH:
            for k, v in node.items():
                if isinstance(v, Mapping):
                    collect(v, f"{where}.{k}" if where else str(k), depth + 1)

    collect(obj, "", 0)
    if not candidates:
        raise IncompatibleStateError(
            "the checkpoint holds no tensors keyed by name (no state dict); "
            f"its top-level keys are {', '.join(map(str, list(obj)[:10]))}",
            hint="pass the state dict itself, e.g. torchkeep.load(path)['model_state_dict']",
        )

    def rank(
        item: tuple[int, tuple[str, dict[str, torch.Tensor]]],
    ) -> tuple[int, int, int, int, int]:
        order, (where, tensors) = item
        overlap = _overlap(module_keys, tensors.keys(), rename)
        name = where.rsplit(".", 1)[-1]
        preferred = (
            PREFERRED_ENTRIES.index(name) if name in PREFERRED_ENTRIES else len(PREFERRED_ENTRIES)
        )
        return (-overlap, -len(tensors), 0 if where == "" else 1, preferred, order)

    where, _ = min(enumerate(candidates), key=rank)[1]
    node: Any = obj
    if where:
        for part in where.split("."):
            node = next(v for k, v in node.items() if str(k) == part)
    if where and len(_tensor_items(node)) != len(node):
        node = _tensor_items(node)
    return node, where


def uses_custom_loading(module: nn.Module) -> bool:
    """True when some submodule changes how ``load_state_dict`` behaves."""
    for m in module.modules():
        if m._load_state_dict_pre_hooks or m._load_state_dict_post_hooks:
            return True
        if m._state_dict_hooks or m._state_dict_pre_hooks:
            return True
        cls = type(m)
        if cls.set_extra_state is not nn.Module.set_extra_state:
            return True
        custom = cls._load_from_state_dict is not nn.Module._load_from_state_dict
        if custom and not isinstance(m, _NormBase):
            return True
    return False


def _tie_key(t: torch.Tensor) -> tuple[Any, ...]:
    """Equal for two tensors of a module that are one: the same object, or the same memory."""
    if t.device.type == "meta" or t.untyped_storage().nbytes() == 0:
        return ("id", id(t))
    return (
        str(t.device),
        t.untyped_storage().data_ptr(),
        t.storage_offset(),
        tuple(t.shape),
        t.stride(),
        t.dtype,
    )


def tie_groups(expected: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """For each tensor key of a module's state, the other keys naming the same tensor.

    ``expected`` is ``module.state_dict(keep_vars=True)``, which lists a tied parameter under
    each of its names (``lm_head.weight`` and ``transformer.wte.weight`` in GPT-2); a tensor
    shared through a view of the same memory counts too.
    """
    groups: dict[tuple[Any, ...], list[str]] = {}
    for k, t in expected.items():
        if isinstance(t, torch.Tensor):
            groups.setdefault(_tie_key(t), []).append(k)
    return {k: tuple(o for o in keys if o != k) for keys in groups.values() for k in keys}


def plan(
    module: nn.Module, state: Mapping[str, Any], *, source: str | None, entry: str
) -> LoadReport:
    """Compare a module's state with a checkpoint's, key by key.

    A key the checkpoint lacks whose tensor the module ties to a key the checkpoint provides
    (with a fitting shape) is loaded through the tie and reported in ``tied``, not ``missing``.
    """
    expected = module.state_dict(keep_vars=True)
    absent = [k for k in expected if k not in state]
    unexpected = tuple(k for k in state if k not in expected)
    mismatched: list[Mismatch] = []
    loaded: list[str] = []
    for k, target in expected.items():
        if k not in state:
            continue
        value = state[k]
        found = tuple(value.shape) if isinstance(value, torch.Tensor) else ()
        if isinstance(target, torch.Tensor) and (
            not isinstance(value, torch.Tensor) or tuple(target.shape) != found
        ):
            mismatched.append(Mismatch(key=k, expected=tuple(target.shape), found=found))
        else:
            loaded.append(k)
    ties = tie_groups(expected) if absent else {}
    done = set(loaded)
    tied: list[Tie] = []
    missing: list[str] = []
    for k in absent:
        to = next((o for o in ties.get(k, ()) if o in done), None)
        if to is None:
            missing.append(k)
        else:
            tied.append(Tie(key=k, to=to))
    return LoadReport(
        loaded=tuple(loaded),
        missing=tuple(missing),
        unexpected=unexpected,
        mismatched=tuple(mismatched),
        tied=tuple(tied),
        source=source,
        entry=entry,
    )


def check(report: LoadReport, module: nn.Module, *, strict: bool, skip_mismatched: bool) -> None:
    """Raise :class:`IncompatibleStateError` when the report breaks the caller's rules.

    A load that would copy no tensor at all is refused whatever ``strict`` says: it is the wrong
    checkpoint, or its keys need a rename, and the message names the prefixes that differ.
    """
    nothing = not report.loaded and bool(report.missing or report.mismatched)
    fatal = (bool(report.missing) or bool(report.unexpected)) if strict else False
    fatal = nothing or fatal or (bool(report.mismatched) and not skip_mismatched)
    if not fatal:
        return
    where = f" from {report.source}" if report.source else ""
    entry = f" (entry {report.entry!r})" if report.entry else ""
    hints = []
    if nothing:  # neither strict=False nor skip_mismatched=True would help
        hints.append(no_match_hint(report.unexpected, report.missing))
        if report.mismatched:
            shared = report.mismatched[0].key
            hints.append(
                f"the names both have ({len(report.mismatched)}, e.g. {shared!r}) differ in "
                "shape: another architecture or size?"
            )
    else:
        if report.mismatched and not skip_mismatched:
            hints.append("skip_mismatched=True keeps the module's own values for mismatched shapes")
        if strict and (report.missing or report.unexpected):
            hints.append("strict=False loads the matching keys and reports the rest")
    summary = "no tensor would be loaded" if nothing else "cannot load the state"
    raise IncompatibleStateError(
        f"{summary}{where}{entry} into {type(module).__name__}: "
        f"{len(report.missing)} missing, {len(report.unexpected)} unexpected, "
        f"{len(report.mismatched)} with another shape\n{report.table()}",
        path=report.source,
        report=report,
        hint="; ".join(hints),
    )


DirectRead = Callable[[torch.Tensor, torch.Tensor], bool]
Materialize = Callable[[Iterable[torch.Tensor]], None]
"""Fetches (and checks) source tensors read lazily from a remote store (``format/_deferred.py``)."""


def apply(
    module: nn.Module,
    state: Mapping[str, Any],
    report: LoadReport,
    *,
    direct_read: DirectRead | None = None,
    release: Callable[[torch.Tensor], None] | None = None,
    materialize: Materialize | None = None,
) -> None:
    """Copy the keys ``report.loaded`` from ``state`` into ``module``, one tensor at a time.

    Args:
        direct_read: ``(source, target) -> bool`` copies the source's bytes straight from its
            file into ``target`` and returns True, or returns False when it cannot.
        release: called with each source tensor once copied, to drop its mapped pages.
        materialize: called with the source tensors of ``report.loaded`` before any is copied:
            downloads and checks those of a partial remote load (and only those).
    """
    if materialize is not None:
        materialize(v for k in report.loaded if isinstance(v := state[k], torch.Tensor))
    if uses_custom_loading(module):
        subset = {k: state[k] for k in report.loaded}
        meta = getattr(state, "_metadata", None)
        if meta is not None:
            subset = _with_metadata(subset, meta)
        module.load_state_dict(subset, strict=False)
        return
    targets = module.state_dict(keep_vars=True)
    with torch.no_grad():
        for key in report.loaded:
            src, dst = state[key], targets[key]
            if direct_read is not None and direct_read(src, dst):
                continue
            try:
                dst.copy_(src)
            except RuntimeError as exc:  # NotImplementedError too: no copy kernel (uint4...)
                raise IncompatibleStateError(
                    f"cannot copy {key!r} ({src.dtype}) into the module's {dst.dtype} "
                    f"{type(dst).__name__}: {str(exc).splitlines()[0]}",
                    path=report.source,
                    key=key,
                    hint="the keys before it were loaded; convert the checkpoint's tensor with "
                    ".to() and save it again, or load it with torchkeep.load and copy by hand",
                ) from exc
            if release is not None:
                release(src)


def _with_metadata(subset: dict[str, Any], meta: Any) -> dict[str, Any]:
    out: OrderedDict[str, Any] = OrderedDict(subset)
    out._metadata = meta  # type: ignore[attr-defined]  # torch's state-dict _metadata
    return out


def prepare(
    module: nn.Module,
    obj: Any,
    *,
    source: str | None,
    strict: bool,
    skip_mismatched: bool = False,
    rename: Mapping[str, str] | None = None,
    entry: str | None = None,
) -> tuple[Mapping[str, Any], LoadReport]:
    """Plan and check the load of ``obj`` into ``module``, copying nothing.

    Args:
        obj: a checkpoint holding the module's state somewhere (:func:`find_state` picks it),
            or, with ``entry``, the module's state itself (an app entry of a run).
        entry: where ``obj`` was found, for the report, when the caller already knows.

    Returns:
        The state with its keys adapted to the module's, and the report.

    Raises:
        IncompatibleStateError: the state breaks ``strict``/``skip_mismatched`` (see :func:`check`).
    """
    module_keys = set(module.state_dict().keys())
    if entry is None:
        state, entry = find_state(module_keys, obj, rename)
    else:
        state = obj
    mapping, renamed = adapt_keys(list(state.keys()), module_keys, rename, path=source)
    if any(old != new for old, new in mapping.items()):
        state = renamed_state(state, mapping)
    report = dataclasses.replace(plan(module, state, source=source, entry=entry), renamed=renamed)
    check(report, module, strict=strict, skip_mismatched=skip_mismatched)
    return state, report


def copy_into(
    module: nn.Module,
    state: Mapping[str, Any],
    report: LoadReport,
    *,
    direct: bool,
    read_files: bool = True,
    materialize: Materialize | None = None,
) -> None:
    """:func:`apply` a prepared load; with ``direct``, bytes go from the file to the parameter.

    ``direct`` is for a state the caller has just loaded from files and not changed (its mapped
    pages are what the files hold, see ``format/_direct.py``); tensors of other origins are
    copied as usual either way. ``read_files=False`` copies from the mapping and drops its
    pages after each tensor (see ``DirectReads``).
    """
    if not direct:
        apply(module, state, report, materialize=materialize)
        return
    with DirectReads(read=read_files) as reads:
        apply(
            module,
            state,
            report,
            direct_read=reads.read,
            release=reads.release,
            materialize=materialize,
        )


def load_module(
    module: nn.Module,
    obj: Any,
    *,
    source: str | None,
    strict: bool,
    skip_mismatched: bool = False,
    rename: Mapping[str, str] | None = None,
    direct: bool = False,
    read_files: bool = True,
    materialize: Materialize | None = None,
) -> LoadReport:
    """Find the module's state in ``obj``, check it, then copy it in: ``load_into``'s core."""
    state, report = prepare(
        module, obj, source=source, strict=strict, skip_mismatched=skip_mismatched, rename=rename
    )
    copy_into(module, state, report, direct=direct, read_files=read_files, materialize=materialize)
    return report
