"""Capturing and restoring a training "app": a dict of stateful objects and plain values.

``app = {"model": model, "optimizer": opt, "scheduler": sched, "rng": RNGState(), "epoch": 3}``.
Each entry is stored under its key, as one of:

* stateful (callable ``state_dict`` and ``load_state_dict``: models, optimizers, LR schedulers,
  GradScaler, ``RNGState``, a user's own object, a DataLoader subclass that implements them):
  its ``state_dict()``;
* ``torch.Generator``: ``{"__torchkeep__": "generator", "state": uint8 tensor}``;
* ``torch.utils.data.DataLoader``: ``{"__torchkeep__": "dataloader", "generator": uint8 tensor
  or None}``, plus ``"sampler_generator"`` when its sampler has a generator of its own;
* plain values (numbers, strings, None, tensors, numpy arrays and dicts, lists, tuples of them):
  as they are, written back into the app on restore.

Anything else raises :class:`UnsupportedValueError` naming the key: nothing is skipped silently.

Why DataLoaders are special: a resume repeats the data order only if the generators behind it
are restored. Each ``iter(loader)`` draws one number from the loader's ``generator`` (the
workers' base seed) and a shuffling sampler draws its permutation from its generator, which is
the loader's when built with ``shuffle=True, generator=g``. Without one, both come from torch's
global generator, saved only when an ``RNGState`` is in the app: a warning says so. Worker
processes reseed Python, NumPy and torch from that base seed at each iterator start; anything
else they hold is not captured, hence a warning when ``num_workers > 0``.

Exact resume needs three things: every RNG (``RNGState``), the sampler's generator (above), and,
mid-epoch, the generator state of the epoch's start. The permutation is drawn when the epoch's
iterator starts, so the state saved mid-epoch, after that draw, cannot replay it. Recipe::

    g = torch.Generator().manual_seed(0)
    loader = DataLoader(data, batch_size=16, shuffle=True, generator=g)
    app = {"model": model, "optimizer": opt, "rng": RNGState(), "loader": loader,
           "epoch": 0, "batch": 0, "epoch_start": g.get_state()}
    mgr.restore(app)
    for epoch in range(app["epoch"], epochs):
        done = app["batch"]
        if done:                                   # resumed mid-epoch: replay its shuffle
            g.set_state(app["epoch_start"])
        else:                                      # a new epoch: remember where it starts
            app["epoch_start"] = g.get_state()
        for b, batch in enumerate(itertools.islice(loader, done, None), start=done):
            train(batch)
            app["epoch"], app["batch"] = (epoch + 1, 0) if b == len(loader) - 1 else (epoch, b + 1)
            mgr.save(epoch * len(loader) + b, app)  # or every N batches

Restoring checks every model (keys and shapes, as :func:`torchkeep.load_into`) and optimizer
(parameter groups) before changing anything; then come the other stateful objects and the
generators (one that refuses its state raises, those before it in app order stay loaded), then
models, then plain values.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, MutableMapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, SubsetRandomSampler, WeightedRandomSampler

from torchkeep.errors import IncompatibleStateError, TorchkeepError, UnsupportedValueError
from torchkeep.format._deferred import handed_on
from torchkeep.format._skeleton import flatten
from torchkeep.state._config import captured_config, class_path
from torchkeep.state._keys import unwrap_module
from torchkeep.state._loading import copy_into, prepare
from torchkeep.state._report import LoadReport
from torchkeep.state._rng import RNGState

TAG = "__torchkeep__"
GENERATOR = "generator"
DATALOADER = "dataloader"
SAMPLER = "sampler_generator"
_SHUFFLING = (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)


def is_stateful(value: Any) -> bool:
    """True for objects with callable ``state_dict`` and ``load_state_dict``."""
    return all(callable(getattr(value, name, None)) for name in ("state_dict", "load_state_dict"))


def _sampler_generator(loader: DataLoader[Any]) -> tuple[bool, torch.Generator | None]:
    """Whether the loader shuffles, and the generator its shuffling sampler draws from."""
    sampler = getattr(loader.batch_sampler, "sampler", None) or loader.sampler
    generator = getattr(sampler, "generator", None)
    if not isinstance(generator, torch.Generator):
        generator = None
    return isinstance(sampler, _SHUFFLING), generator


def _capture_loader(key: str, loader: DataLoader[Any], has_rng: bool) -> dict[str, Any]:
    shuffles, sampler_generator = _sampler_generator(loader)
    if shuffles and sampler_generator is None:
        where = "saved by the app's RNGState" if has_rng else "NOT saved: the app has no RNGState"
        warnings.warn(
            f"DataLoader {key!r} shuffles without a generator of its own, so its order depends "
            f"on torch's global random generator ({where}); pass generator=torch.Generator() "
            "to the DataLoader (or to its sampler) for an order that resumes exactly",
            UserWarning,
            stacklevel=3,
        )
    if loader.num_workers > 0:
        warnings.warn(
            f"DataLoader {key!r} has {loader.num_workers} worker processes whose random "
            "generators are not captured: torch reseeds their Python, NumPy and torch generators "
            "from the loader's generator when an iterator starts (so persistent_workers=True "
            "does not resume exactly); seed any other library in a worker_init_fn from "
            "torch.initial_seed()",
            UserWarning,
            stacklevel=3,
        )
    generator = loader.generator
    entry: dict[str, Any] = {
        TAG: DATALOADER,
        "generator": None if generator is None else generator.get_state(),
    }
    if sampler_generator is not None and sampler_generator is not generator:
        entry[SAMPLER] = sampler_generator.get_state()
    return entry


def capture_app(app: Mapping[str, Any]) -> dict[str, Any]:
    """The storable state of every entry of ``app``, under the same keys.

    Raises:
        UnsupportedValueError: an entry is neither stateful nor a plain value (names the key).
    """
    has_rng = any(isinstance(v, RNGState) for v in app.values())
    state: dict[str, Any] = {}
    for key, value in app.items():
        if not isinstance(key, str):
            raise UnsupportedValueError(f"app keys must be strings, not {key!r}", key=repr(key))
        if is_stateful(value):
            state[key] = value.state_dict()
            continue  # validated when written: flattening a whole model twice costs time
        if isinstance(value, torch.Generator):
            state[key] = {TAG: GENERATOR, "state": value.get_state()}
        elif isinstance(value, DataLoader):
            state[key] = _capture_loader(key, value, has_rng)
        else:
            try:
                flatten(value)
            except UnsupportedValueError as exc:
                raise UnsupportedValueError(
                    f"app entry {key!r} ({type(value).__qualname__}) is neither stateful (no "
                    f"state_dict()/load_state_dict()) nor a plain value: {exc.message}",
                    key=key,
                    hint="give it state_dict() and load_state_dict() methods, convert it to "
                    "numbers, strings, tensors and lists or dicts of them, or leave it out",
                ) from exc
            state[key] = value
    return state


def describe_models(app: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """How to rebuild each model of ``app``: ``{key: {"class": "pkg.mod:Name", "config": ...}}``.

    Only models whose constructor arguments are known (:func:`torchkeep.capture_config`,
    :class:`torchkeep.ConfigMixin`) are described, as :func:`torchkeep.save_model` would; a
    wrapper (DataParallel, DDP, ``torch.compile``) is described by the model it wraps. A model
    that could not be rebuilt from its description (a class defined inside a function, built
    with ``*args``, or a config holding tensors or values only pickle stores) is left out: its
    checkpoint is still saved, ``torchkeep.load_into`` still loads it.
    """
    models: dict[str, dict[str, Any]] = {}
    for key, value in app.items():
        if not isinstance(value, nn.Module):
            continue
        model = unwrap_module(value)
        try:
            config = captured_config(model)
            if config is None:
                continue
            path = class_path(type(model))
            flat = flatten(config)
        except TorchkeepError:
            continue
        if not flat.tensors:
            models[str(key)] = {"class": path, "config": flat.skeleton}
    return models


def _incompatible(key: str, what: str, source: str | None, **kwargs: Any) -> IncompatibleStateError:
    return IncompatibleStateError(f"app entry {key!r}: {what}", path=source, key=key, **kwargs)


def _plan_module(
    key: str, module: nn.Module, saved: Any, *, strict: bool, source: str | None
) -> tuple[Mapping[str, Any], LoadReport]:
    if not isinstance(saved, Mapping) or not all(isinstance(k, str) for k in saved):
        raise _incompatible(key, f"the checkpoint holds a {type(saved).__name__}", source)
    saved, report = prepare(module, saved, source=source, strict=strict, entry=key)
    if not report.ok:
        warnings.warn(
            f"app entry {key!r} loaded partially (strict=False):\n{report.table()}",
            UserWarning,
            stacklevel=3,
        )
    return saved, report


def _check_optimizer(key: str, opt: torch.optim.Optimizer, saved: Any, source: str | None) -> None:
    groups = saved.get("param_groups") if isinstance(saved, Mapping) else None
    if not isinstance(groups, list | tuple):
        raise _incompatible(key, "the checkpoint holds no optimizer state here", source)
    mine = [len(g["params"]) for g in opt.param_groups]
    theirs = [len(g["params"]) if isinstance(g, Mapping) else -1 for g in groups]
    if mine != theirs:
        raise _incompatible(
            key,
            f"the optimizer has param groups of sizes {mine}, the checkpoint {theirs} (layers "
            "frozen or unfrozen since saving?)",
            source,
            expected=mine,
            actual=theirs,
            hint="build the optimizer with the same param groups as when saving, or leave it "
            "out of the app to restore the rest",
        )


def _set_generator(key: str, what: str, target: torch.Generator | None, saved: Any) -> None:
    if saved is not None and target is not None:
        target.set_state(saved)
    elif saved is not None or target is not None:
        found = "holds its state but it has none" if target is None else "holds no state for it"
        warnings.warn(
            f"app entry {key!r}: {what} not restored (the checkpoint {found}), so the data "
            "order will not repeat the original run's",
            UserWarning,
            stacklevel=4,
        )


def _restore_special(key: str, target: Any, saved: Any) -> None:
    if isinstance(target, torch.Generator):
        target.set_state(saved["state"])
        return
    _set_generator(key, "the DataLoader's generator", target.generator, saved["generator"])
    _, sampler_generator = _sampler_generator(target)
    if sampler_generator is target.generator:
        sampler_generator = None
    _set_generator(key, "its sampler's generator", sampler_generator, saved.get(SAMPLER))


def restore_app(
    app: MutableMapping[str, Any],
    state: Mapping[str, Any],
    *,
    strict: bool = True,
    source: str | None = None,
    direct: bool = True,
) -> dict[str, Any]:
    """Load ``state`` (from :func:`capture_app`) into ``app`` in place.

    Args:
        app: the live objects; stateful ones are loaded in place, plain values replaced.
        state: the captured state, as read back from a checkpoint.
        strict: raise when an app entry is absent from ``state`` or a model's keys differ;
            with ``strict=False`` those are skipped with a warning.
        source: the checkpoint, for messages.
        direct: ``state`` was just loaded from files and not changed since (as
            ``CheckpointManager.restore`` does): each model tensor's mapped pages are dropped
            once copied, keeping memory near one copy. ``False`` leaves them.

    Returns:
        The plain values: those written back into ``app``, and the entries of ``state`` that
        ``app`` lacks (not added to ``app``).

    Raises:
        IncompatibleStateError: an entry does not fit (another architecture, other parameter
            groups, a malformed state); models and optimizers are checked before any change.
    """
    missing = [k for k in app if k not in state]
    if missing and strict:
        raise IncompatibleStateError(
            f"the checkpoint has no entry for {', '.join(map(repr, missing))} "
            f"(it holds {', '.join(map(repr, state)) or 'nothing'})",
            path=source,
            hint="restore with strict=False to load the other entries",
        )
    if missing:
        warnings.warn(f"not restored (absent from the checkpoint): {missing}", stacklevel=2)
    present = {k: v for k, v in app.items() if k not in missing}
    # A remote checkpoint's tensors are fetched (and checked) as they are used: all of each
    # entry handed on, only the keys copied of a model's (see format/_deferred.py).
    deferred = handed_on()

    def ready(obj: Any) -> None:
        if deferred is not None:
            deferred.materialize_tree(obj)

    modules: dict[str, tuple[Mapping[str, Any], LoadReport]] = {}
    for key, target in present.items():  # check everything before changing anything
        saved = state[key]
        if isinstance(target, nn.Module):
            modules[key] = _plan_module(key, target, saved, strict=strict, source=source)
        elif isinstance(target, torch.optim.Optimizer):
            _check_optimizer(key, target, saved, source)
        elif _is_special(target):
            kind = GENERATOR if isinstance(target, torch.Generator) else DATALOADER
            if not isinstance(saved, Mapping) or saved.get(TAG) != kind:
                raise _incompatible(key, f"the checkpoint holds no {kind} state here", source)
    for key, target in present.items():
        if key in modules or not (is_stateful(target) or _is_special(target)):
            continue
        ready(state[key])
        try:
            if is_stateful(target):
                target.load_state_dict(state[key])
            else:
                _restore_special(key, target, state[key])
        except Warning:  # a warning turned into an error (-W error) is the caller's, as it is
            raise
        except Exception as exc:
            text = exc.message if isinstance(exc, TorchkeepError) else str(exc)
            raise _incompatible(
                key,
                f"{type(target).__qualname__} refused its saved state: {text}",
                source,
                hint="build it as it was when saving, or leave it out of the app to restore "
                "the rest",
            ) from exc
    for key, (saved, report) in modules.items():  # read from the packs into the parameters
        materialize = None if deferred is None else deferred.materialize
        copy_into(
            present[key], saved, report, direct=direct, read_files=False, materialize=materialize
        )
    values: dict[str, Any] = {}
    for key, saved in state.items():
        if key not in app or not (is_stateful(app[key]) or _is_special(app[key])):
            ready(saved)
        if key not in app:
            values[key] = saved
        elif not (is_stateful(app[key]) or _is_special(app[key])):
            app[key] = values[key] = saved
    return values


def _is_special(value: Any) -> bool:
    """A generator or a DataLoader without state_dict(): captured by torchkeep itself."""
    return isinstance(value, torch.Generator | DataLoader) and not is_stateful(value)
