"""Single-artifact save and load: the verbs most users need.

``save``/``load`` move nested states (state dicts, tutorial-style checkpoint dicts) to and from
one file; ``load_into`` fills a module from any checkpoint; ``save_model``/``load_model`` keep a
whole model (weights plus how to rebuild it) without pickle; ``inspect`` describes a file.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from torchkeep._version import __version__
from torchkeep.errors import (
    CorruptCheckpointError,
    IncompatibleStateError,
    InvalidArgumentError,
    ModelClassError,
    UnsupportedValueError,
)
from torchkeep.format import (
    FORMAT_VERSION,
    MODEL_FILE,
    WEIGHTS_FILE,
    CheckpointInfo,
    Format,
    Manifest,
    MapLocation,
    RunReader,
    RunSource,
    flatten,
    load_reference,
    model_description,
    open_source,
    read_model_description,
    seal_json,
    write_artifact,
    write_torch,
)
from torchkeep.state import (
    AllowImport,
    LoadReport,
    adapt_keys,
    allowed_modules,
    captured_config,
    checked_model_class,
    class_path,
    find_state,
    import_model_class,
    load_module,
)
from torchkeep.storage import atomic_write, local_path

PathLike = str | os.PathLike[str]
TORCH_SUFFIXES = frozenset({".pt", ".pth", ".tar", ".bin", ".ckpt"})


def save(obj: Any, path: PathLike, *, metadata: dict[str, Any] | None = None) -> None:
    """Save a state dict or a nested checkpoint dict to one file, atomically.

    A ``.pt``, ``.pth``, ``.tar``, ``.bin`` or ``.ckpt`` path gives torch's zip format, loadable by
    ``torch.load(weights_only=True)``; any other path (``.safetensors``) gives a plain safetensors
    file whose header also holds the nested structure and ``metadata``. Tensors sharing storage
    (tied weights) are stored once. A crash mid-save leaves the previous file intact.

    Args:
        obj: dicts, lists, tuples and sets of tensors, numbers, strings, bools, None, bytes,
            numpy arrays, scalars and dtypes, ``pathlib`` paths, ``torch.__version__``,
            ``torch.Size``, ``torch.dtype`` and ``torch.device``. In a ``.pt`` file, numpy
            values, paths and the torch version are pickled as ``torch.save`` pickles them:
            ``torchkeep.load`` reads them back, plain ``torch.load(weights_only=True)`` only
            with those globals allow-listed.
        path: the destination file.
        metadata: JSON-able information kept beside the tensors (hyperparameters, metrics...).

    Raises:
        UnsupportedValueError: ``obj`` holds a value that could only be stored by pickling code.
        StorageError: the disk failed (full, read-only, permission denied).

    Example:
        >>> torchkeep.save({"epoch": 3, "model_state_dict": model.state_dict()}, "ckpt.safetensors",
        ...                metadata={"lr": 1e-3})
    """
    target = local_path(path)
    try:
        if target.suffix.lower() in TORCH_SUFFIXES:
            atomic_write(target, lambda f: write_torch(obj, f, metadata))
        else:
            atomic_write(target, lambda f: write_artifact(obj, f, metadata))
    except UnsupportedValueError as err:
        if err.path is None:  # the flattener knows the key, not the file
            err.path = str(target)
        raise


def load(
    path: PathLike,
    *,
    map_location: MapLocation = None,
    dtype: torch.dtype | None = None,
    trust: bool = False,
    verify: bool = True,
) -> Any:
    """Load a checkpoint of any supported format without running code from it.

    Reads torchkeep and plain safetensors files, Hugging Face sharded checkpoints (the
    ``*.index.json`` or its directory), and ``torch.save`` files through
    ``torch.load(weights_only=True)`` only. The format is detected from the bytes. Tensors stay
    mapped from the file until used.

    Args:
        path: a file, or a directory holding one checkpoint.
        map_location: as in ``torch.load``: a device, a string, a dict of location to location, or
            a callable ``(storage, location) -> storage``. ``None`` keeps each tensor where it was
            saved.
        dtype: cast floating-point tensors to this dtype (integer, bool and complex are kept).
        trust: allow a ``torch.save`` file to import the globals it names. That runs code from the
            file: only for files you trust. Not needed for the harmless values real checkpoints
            carry (numpy arrays, scalars and dtypes, ``pathlib`` paths, ``torch.__version__``):
            torchkeep rebuilds those itself.
        verify: check every tensor against the hash recorded when it was saved (torchkeep
            ``.safetensors`` and ``.pt`` files and run checkpoints; the default, which reads every
            tensor once, at ~10 GB/s), and the zip's CRC-32 of every member of a torch zip file
            from elsewhere. Plain safetensors and legacy torch files store no checksum.
            ``False`` skips that and keeps tensors lazily mapped.

    Raises:
        CheckpointNotFoundError: nothing at ``path``.
        CorruptCheckpointError: the file is damaged or in no format torchkeep reads.
        UnsafeCheckpointError: the file needs globals the safe unpickler refuses (names them).
    """
    return open_source(path).load(
        map_location=map_location, dtype=dtype, trust=trust, verify=verify
    )


def inspect(path: PathLike) -> CheckpointInfo:
    """Describe a checkpoint (format, tensors, sharing, metadata) without reading tensor data.

    A checkpoint directory that is not a run, a ``save_model`` directory or a sharded checkpoint
    (a Trainer ``checkpoint-N/``, Accelerate ``save_state`` output) is described file by file:
    ``info.files`` lists each with its kind (checkpoint, side file...), format and size, and
    ``info.tensors`` holds every tensor as ``<file>/<name>``.
    """
    return open_source(path).info()


def load_into(
    module: nn.Module,
    source: PathLike | Mapping[str, Any],
    *,
    strict: bool = True,
    skip_mismatched: bool = False,
    rename: Mapping[str, str] | None = None,
    verify: bool = True,
) -> LoadReport:
    """Load a checkpoint into ``module`` in place, tensor by tensor, and report what happened.

    The module's state is found in the checkpoint by itself: the file may be a state dict or a
    checkpoint dict holding one (``model_state_dict``, ``state_dict``, ``model``...). Everything is
    checked before anything is copied, so a load that raises leaves the module as it was. Peak
    memory stays near one copy of the weights: tensors are read from the file straight into the
    parameters where possible.

    Args:
        module: the module to fill.
        source: a checkpoint path (any format :func:`load` reads) or a state dict.
        strict: raise on missing or unexpected keys. With ``strict=False`` they are reported.
        skip_mismatched: leave parameters whose shape differs (a new classifier head) at their
            current values and report them, instead of raising.
        rename: regular expression -> replacement rules applied in order to the checkpoint's
            keys (``{r"^fc[.]": "head."}``). Wrapper prefixes (``module.`` from DDP,
            ``_orig_mod.`` from ``torch.compile``, a LightningModule's ``model.``) are handled
            without rules when unambiguous. ``report.renamed`` says what was changed.
        verify: check the checkpoint's tensors against their recorded hashes before copying
            anything (torchkeep files and run checkpoints; the zip CRC-32s of other torch files).

    Returns:
        A :class:`LoadReport` with the loaded, missing, unexpected and mismatched keys.

    Raises:
        IncompatibleStateError: the state does not fit; the message has a table of differences.
    """
    if isinstance(source, Mapping):
        return load_module(
            module,
            source,
            source=None,
            strict=strict,
            skip_mismatched=skip_mismatched,
            rename=rename,
        )
    obj = open_source(source).load(verify=verify)
    return load_module(
        module,
        obj,
        source=os.fspath(source),
        strict=strict,
        skip_mismatched=skip_mismatched,
        rename=rename,
        direct=True,  # just loaded, mapped from its files: read straight into the parameters
    )


def save_model(model: nn.Module, path: PathLike, *, config: dict[str, Any] | None = None) -> None:
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

    atomic_write(directory / MODEL_FILE, write_description)


def load_model(
    path: PathLike,
    map_location: str | torch.device | None = None,
    *,
    trust: bool = False,
    key: str | None = None,
    model_class: type[nn.Module] | None = None,
    allow_import: AllowImport = None,
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
    chooser = _ClassChooser(model_class, allow_import)
    source = open_source(path)
    if isinstance(source, RunSource):
        name = os.fspath(path)
        model: nn.Module = load_reference(
            path, lambda run, m: _rebuild_from_run(m, run, name, key, chooser)
        )
    elif source.format is Format.MODEL_DIR:
        model = _rebuild(source.path, chooser)
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


#: The suffixes ``convert`` writes, and the format each gives.
CONVERT_SUFFIXES = {".safetensors": "safetensors", **dict.fromkeys(sorted(TORCH_SUFFIXES), "torch")}


def _check_convert_suffix(target: Path) -> None:
    suffix = target.suffix.lower()
    if suffix in CONVERT_SUFFIXES:
        return
    known = ", ".join(CONVERT_SUFFIXES)
    hint = f"name the output with one of {known}"
    if suffix in (".onnx", ".pt2"):
        hint += f"; to export a model to {suffix}, use torchkeep.export (torchkeep export)"
    raise InvalidArgumentError(
        f"convert cannot write {f'a {suffix} file' if suffix else 'a path without a suffix'}: "
        "it writes "
        f"safetensors (.safetensors) and torch files ({', '.join(sorted(TORCH_SUFFIXES))})",
        path=str(target),
        expected=list(CONVERT_SUFFIXES),
        actual=suffix,
        hint=hint,
    )


def convert(
    source: PathLike,
    destination: PathLike,
    *,
    strip_prefix: str | None = None,
    rename: Mapping[str, str] | None = None,
    dtype: torch.dtype | None = None,
    only: str | list[str] | None = None,
) -> CheckpointInfo:
    """Convert a checkpoint to another format (by ``destination``'s suffix), optionally reshaping it.

    Without key options the whole structure is kept, so a legacy ``.pt`` becomes a safetensors
    file holding the same checkpoint dict. With ``strip_prefix``, ``rename`` or ``only``, the
    state dict inside the checkpoint (the largest dict of tensors, e.g. ``state_dict``) is
    written alone, with its keys changed. The source is read safely (``weights_only``).

    Args:
        source: any checkpoint :func:`load` reads.
        destination: ``.safetensors`` (default) or ``.pt/.pth/.bin/.ckpt/.tar``.
        strip_prefix: removed from the start of every key that has it (``"module."``).
        rename: regular expression -> replacement, applied to the keys in order.
        dtype: cast floating-point tensors (``torch.bfloat16``).
        only: glob(s) over the source keys to keep (``"encoder.*"``).

    Returns:
        :func:`inspect` of the written file.

    Raises:
        TorchkeepError: ``destination``'s suffix names no format ``convert`` writes (the
            message lists those it does); nothing is read or written.
    """
    _check_convert_suffix(local_path(destination))
    obj = load(source, dtype=dtype)
    info = inspect(source)
    metadata = {**info.metadata, "converted_from": os.fspath(source)}
    if strip_prefix is not None or rename or only:
        state, _ = find_state(set(), obj)
        patterns = [only] if isinstance(only, str) else list(only or [])
        keys = [
            k for k in state if not patterns or any(fnmatch.fnmatchcase(k, p) for p in patterns)
        ]
        if not keys:
            raise IncompatibleStateError(
                f"no tensor key matches {patterns}", path=os.fspath(source), hint="check --only"
            )
        rules = dict(rename or {})
        if strip_prefix:
            rules = {"^" + re.escape(strip_prefix): "", **rules}
        mapping, _ = adapt_keys(keys, [], rules, path=os.fspath(source))
        obj = {mapping[k]: state[k] for k in keys}
    save(obj, destination, metadata=metadata)
    return inspect(destination)
