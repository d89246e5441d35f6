"""``save_model``/``load_model``: a whole model (weights plus how to rebuild it), without pickle.

They live below ``_export`` (which rebuilds a model directory or ``RUN@best`` with ``load_model``
before exporting it), so that ``_export`` imports downward.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from torchkeep._version import __version__
from torchkeep.errors import (
    CorruptCheckpointError,
    ModelClassError,
    UnsupportedValueError,
)
from torchkeep.format import (
    FORMAT_VERSION,
    MODEL_FILE,
    WEIGHTS_FILE,
    Format,
    Manifest,
    RegistrySource,
    RunReader,
    RunSource,
    flatten,
    load_reference,
    model_description,
    open_source,
    read_model_description,
    seal_json,
)
from torchkeep.io._load_into import load_into
from torchkeep.io._save import PathLike, save
from torchkeep.state import (
    AllowImport,
    allowed_modules,
    captured_config,
    checked_model_class,
    class_path,
    import_model_class,
    load_module,
)
from torchkeep.storage import local_path, storage_for
from torchkeep.storage._location import with_options


def save_model(
    model: nn.Module,
    path: PathLike,
    *,
    config: dict[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Save a whole model without pickle: its weights, class import path and constructor arguments.

    The directory gets ``model.safetensors`` (the state dict) and ``torchkeep_model.json`` (class
    and config), written in that order, each atomically.

    Args:
        model: the model; its class must be importable (defined at module level).
        path: the directory to write.
        config: keyword arguments that rebuild the model (``type(model)(**config)``). When omitted,
            those captured at construction by :func:`capture_config` or :class:`ConfigMixin`.

    Raises:
        UnsupportedValueError: no config was given or captured, or it holds unstorable values.
        ModelClassError: the class cannot be imported later (defined inside a function).
        StorageError: ``path`` is a URL (remote storage is not supported yet).

    Warns:
        UserWarning: the class is defined in ``__main__``: only the same script can load it.
    """
    path = with_options(path, storage_options)
    directory = local_path(path)
    if config is None:
        config = captured_config(model)
    if config is None:
        raise UnsupportedValueError(
            f"no constructor arguments known for {type(model).__qualname__}",
            path=str(path),
            hint="pass config={...} (the keyword arguments that rebuild it), or decorate the "
            "class with @torchkeep.capture_config",
        )
    flat = flatten(config)
    if flat.tensors:
        raise UnsupportedValueError(
            "the model config holds tensors; they belong in the weights",
            path=str(path),
            hint="pass only plain values (numbers, strings, lists, dicts) in config",
        )
    cls_path = class_path(type(model))
    if type(model).__module__ == "__main__":
        warnings.warn(
            f"{directory}: {type(model).__qualname__} is defined in __main__ (the script being "
            "run), so only that same script can load this model with torchkeep.load_model; "
            "move the class into a module (e.g. models.py) and import it from the script, "
            "then save again",
            UserWarning,
            stacklevel=2,
        )
    document = {
        "format_version": FORMAT_VERSION,
        "torchkeep_version": __version__,
        "torch_version": str(torch.__version__),
        "class": cls_path,
        "config": flat.skeleton,
    }
    save(model.state_dict(), directory / WEIGHTS_FILE)
    text = seal_json(json.dumps(document, indent=2).encode())  # the digest covers every byte

    def write_description(f: BinaryIO) -> None:
        f.write(text)

    storage_for(directory).write_atomic(str(directory / MODEL_FILE), write_description)


def load_model(
    path: PathLike,
    map_location: str | torch.device | None = None,
    *,
    trust: bool = False,
    key: str | None = None,
    model_class: type[nn.Module] | None = None,
    allow_import: AllowImport = None,
    storage_options: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Rebuild a saved model, weights loaded (strictly), in eval mode.

    ``path`` is a :func:`save_model` directory, or a checkpoint of a run
    (``"runs/exp1@best"``, ``"runs/exp1@latest"``, ``"runs/exp1@<step>"``): a
    :class:`CheckpointManager` records how to rebuild each model of the app whose class was
    decorated with :func:`capture_config` (or derives from :class:`ConfigMixin`). A file
    written by ``torch.save(model)`` (a pickled module) is loaded only with ``trust=True``,
    since unpickling it runs code from the file.

    Args:
        path: a :func:`save_model` directory, a run reference, or (with ``trust=True``) a
            pickled model file.
        map_location: the device to put the model on (default: the CPU).
        trust: allow unpickling a full-model file.
        key: for a run reference, the app entry to rebuild (``"ema"``). Needed only when the
            checkpoint records several models and none is under ``"model"``.
        model_class: the class to build with the recorded config, instead of the one the file
            names (nothing is imported; its import path may differ, e.g. after a move).
        allow_import: module names (or package prefixes: ``"mypkg"`` allows ``mypkg.models``)
            that the recorded class may be imported from. The class name comes from the file
            and importing a module runs its code, so a module that is not already imported in
            this process is imported only when allowed here.

    Raises:
        ModelClassError: the class's module is neither imported nor allowed, the class cannot
            be imported or rejects the saved config; or the run's checkpoint records no model
            (or several, without ``key``).
        UnsafeCheckpointError: a pickled model without ``trust=True``.

    Example:
        >>> model = torchkeep.load_model("runs/exp1@best", model_class=Net)  # the app's "model"
        >>> ema = torchkeep.load_model("runs/exp1@best", key="ema", allow_import="mypkg")
    """
    path = with_options(path, storage_options)
    chooser = _ClassChooser(model_class, allow_import)
    source = open_source(path)
    if isinstance(source, RunSource):
        name = os.fspath(path)
        model: nn.Module = load_reference(
            path, lambda run, m: _rebuild_from_run(m, run, name, key, chooser)
        )
    elif source.format is Format.MODEL_DIR:
        model = _rebuild(source.path, chooser)
    elif isinstance(source, RegistrySource) and source.version().model is not None:
        model = _rebuild_registered(source, chooser)
    else:
        obj = source.load(map_location=map_location, trust=trust)
        if not isinstance(obj, nn.Module):
            raise ModelClassError(
                "the file holds weights, not a model",
                path=str(source.path),
                hint="build the model and call torchkeep.load_into(model, path), "
                "or save it with torchkeep.save_model",
            )
        model = obj
    if map_location is not None:
        model = model.to(map_location)
    return model.eval()


@dataclasses.dataclass(frozen=True, slots=True)
class _ClassChooser:
    """Which class :func:`load_model` builds: the caller's, or the recorded one if allowed."""

    model_class: type[nn.Module] | None
    allow_import: AllowImport

    def __post_init__(self) -> None:
        # Checked (and an iterator read) once, now: a wrong type fails whatever the file holds.
        object.__setattr__(self, "allow_import", allowed_modules(self.allow_import))

    def __call__(self, class_name: str, *, source: str) -> type[nn.Module]:
        if self.model_class is not None:
            return checked_model_class(self.model_class, class_name, source=source)
        return import_model_class(class_name, source=source, allow_import=self.allow_import)


def _construct(
    class_name: str, config: dict[str, Any], *, source: str, chooser: _ClassChooser
) -> nn.Module:
    """``cls(**config)`` for the recorded class, with a clear error when it refuses."""
    cls = chooser(class_name, source=source)
    try:
        return cls(**config)
    except TypeError as exc:
        raise ModelClassError(
            f"{class_name} rejected the saved config: {exc}",
            path=source,
            key=class_name,
            hint="the class's constructor changed since saving; pass matching arguments by "
            "building it yourself and calling torchkeep.load_into",
        ) from exc


def _rebuild(directory: Path, chooser: _ClassChooser) -> nn.Module:
    class_name, config = read_model_description(directory)
    model = _construct(class_name, config, source=str(directory), chooser=chooser)
    load_into(model, directory / WEIGHTS_FILE, strict=True)
    return model


def _pick_model(models: Mapping[str, Any], key: str | None, name: str) -> str:
    """The app key of the model to rebuild from a checkpoint's recorded ``models``."""
    keys = ", ".join(map(repr, models))
    if not models:
        raise ModelClassError(
            "the checkpoint records no model that can be rebuilt",
            path=name,
            hint="decorate the model class with @torchkeep.capture_config (or subclass "
            "torchkeep.ConfigMixin) so that the CheckpointManager records how to build it, or "
            f"build the model yourself and call torchkeep.load_into(model, {name!r})",
        )
    if key is not None:
        if key not in models:
            raise ModelClassError(
                f"the checkpoint records no model under {key!r}; it records {keys}",
                path=name,
                key=key,
                hint="pass one of those as key=",
            )
        return key
    if len(models) == 1:
        return next(iter(models))
    if "model" in models:
        return "model"
    raise ModelClassError(
        f"the checkpoint records several models ({keys}); which one to rebuild?",
        path=name,
        hint=f"choose with key=, e.g. torchkeep.load_model({name!r}, key={next(iter(models))!r})",
    )


def _rebuild_from_run(
    manifest: Manifest, run: RunReader, name: str, key: str | None, chooser: _ClassChooser
) -> nn.Module:
    """Build the chosen model of a run's checkpoint and load its entry's weights strictly."""
    entry = _pick_model(manifest.models, key, name)
    class_name, config = model_description(manifest.models[entry], source=str(manifest.path))
    model = _construct(class_name, config, source=name, chooser=chooser)
    state = run.load(manifest)
    if not isinstance(state, Mapping) or entry not in state:
        raise CorruptCheckpointError(
            f"the manifest describes model {entry!r}, but the checkpoint holds no such entry",
            path=str(manifest.path),
            key=entry,
        )
    load_module(model, state[entry], source=name, strict=True, direct=True)
    return model


def _rebuild_registered(source: RegistrySource, chooser: _ClassChooser) -> nn.Module:
    """Build a registered version's model from its recorded class and config, weights loaded."""
    description = source.version().model or {}
    class_name, config = model_description(description, source=source.name)
    model = _construct(class_name, config, source=source.name, chooser=chooser)
    load_module(model, source.load(), source=source.name, strict=True, direct=True)
    return model
