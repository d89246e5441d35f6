"""What ``register`` accepts as a source, turned into a state dict and what is known about it.

A module gives its ``state_dict()`` and, when its constructor arguments are known (captured by
``capture_config``/``ConfigMixin``, or given as ``config=`` and accepted by the constructor), how
to rebuild it. A run reference gives the checkpoint's model entry, the class and config the run
recorded, the checkpoint's metrics and the run's metrics history up to that step. A
``save_model`` directory gives its weights and description; any other file or reference what
``load`` returns.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from torchkeep.errors import TorchkeepError, UnsupportedValueError
from torchkeep.format import (
    METRICS_FILE,
    WEIGHTS_FILE,
    Format,
    Manifest,
    RegistrySource,
    RunReader,
    flatten,
    load_reference,
    locate,
    model_description,
    open_source,
    parse_reference,
    read_model_description,
)
from torchkeep.io import load
from torchkeep.state import captured_config, class_path
from torchkeep.storage import storage_for


@dataclass(kw_only=True)
class Resolved:
    """A source made ready to register."""

    state: Any
    source: str
    model: dict[str, Any] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


def describe_model(cls: type[nn.Module], config: Mapping[str, Any]) -> dict[str, Any]:
    """``{"class", "config"}`` as a run's manifest records a model (the config a skeleton)."""
    flat = flatten(dict(config))
    if flat.tensors:
        raise UnsupportedValueError(
            "the model config holds tensors; they belong in the weights",
            hint="pass only plain values (numbers, strings, lists, dicts) in config",
        )
    return {"class": class_path(cls), "config": flat.skeleton}


def _accepts(cls: type[nn.Module], config: Mapping[str, Any]) -> bool:
    try:
        inspect.signature(cls).bind(**config)
    except (TypeError, ValueError):
        return False
    return True


def resolve(source: Any, config: Mapping[str, Any] | None) -> Resolved:
    """The state, model description, metrics and history of ``source``.

    Raises:
        UnsupportedValueError: a source of another kind, or one that holds no tensor.
    """
    if isinstance(source, nn.Module):
        found = Resolved(state=dict(source.state_dict()), source=f"module {type(source).__name__}")
        ctor = captured_config(source)
        if ctor is None and config and _accepts(type(source), config):
            ctor = dict(config)
        if ctor is not None:
            try:
                found.model = describe_model(type(source), ctor)
            except TorchkeepError:  # a local class, tensors in the config: weights only
                found.model = None
            found.config = dict(ctor)
    elif isinstance(source, Mapping):
        found = Resolved(state=dict(source), source="state dict")
    elif isinstance(source, str | os.PathLike):
        found = _from_reference(source)
    else:
        raise UnsupportedValueError(
            f"cannot register a {type(source).__name__}",
            hint="register a module, a state dict, a checkpoint file or a run reference "
            "(runs/x@best)",
        )
    if not any(isinstance(t, torch.Tensor) for t in _leaves(found.state)):
        raise UnsupportedValueError(
            f"the source ({found.source}) holds no tensor to register",
            hint="register a module, its state_dict(), or a checkpoint with weights",
        )
    return found


def _leaves(x: Any) -> list[Any]:
    if isinstance(x, Mapping):
        return [y for v in x.values() for y in _leaves(v)]
    if isinstance(x, list | tuple):
        return [y for v in x for y in _leaves(v)]
    return [x]


def _from_reference(ref: str | os.PathLike[str]) -> Resolved:
    text = os.fspath(ref)
    if parse_reference(text) is not None:
        resolved: Resolved = load_reference(text, lambda run, m: _from_run(run, m, text))
        return resolved
    found = locate(text)
    if isinstance(found, RegistrySource):
        v = found.version()
        return Resolved(
            state=found.load(),
            source=v.reference,
            model=v.model,
            config=dict(v.config),
            metrics=dict(v.metrics),
            history=list(v.history),
        )
    source = open_source(text)
    if source.format is Format.MODEL_DIR:
        cls_name, ctor = read_model_description(source.path)
        description = {"class": cls_name, "config": flatten(ctor).skeleton}
        state = load(source.path / WEIGHTS_FILE)
        return Resolved(state=state, source=text, model=description, config=ctor)
    return Resolved(state=source.load(), source=text)


def _from_run(run: RunReader, manifest: Manifest, text: str) -> Resolved:
    state = run.load(manifest)
    entry = None
    if manifest.models:
        entry = "model" if "model" in manifest.models else next(iter(manifest.models))
    elif isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        entry = "model"
    model = manifest.models.get(entry) if entry is not None else None
    found = Resolved(
        state=state[entry] if entry is not None else state,
        source=f"{run.root}@{manifest.step}" + (f" ({entry})" if entry else ""),
        model=dict(model) if model else None,
        metrics={"step": manifest.step, **manifest.metrics},
        history=_history(run, manifest.step),
    )
    if model:
        found.config = model_description(model, source=text)[1]
    return found


def _history(run: RunReader, step: int) -> list[dict[str, Any]]:
    """The run's metrics records up to ``step`` (``metrics.jsonl``), damaged lines skipped."""
    path = run.root / METRICS_FILE
    try:
        with storage_for(path).open_read(str(path)) as f:
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if (
            isinstance(record, dict)
            and isinstance(record.get("step"), int)
            and record["step"] <= step
        ):
            out.append(record)
    return out
