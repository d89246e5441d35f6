"""Capturing and restoring a training "app": a dict of stateful objects and plain values.

``app = {"model": model, "optimizer": opt, "scheduler": sched, "rng": RNGState(), "epoch": 3}``.
Anything with ``state_dict()``/``load_state_dict()`` is stateful (models, optimizers, LR
schedulers, GradScaler, a user's own object); numbers, strings, tensors and containers of them are
plain values, saved as they are and written back into the app on restore.

Two kinds of objects get special care because exact resume depends on them and they have no
``state_dict``:

* ``torch.Generator``: its ``get_state()`` is saved and set back.
* ``torch.utils.data.DataLoader``: its shuffle order comes from its ``generator`` (saved when it
  has one) or else from torch's global generator (saved only when an ``RNGState`` is in the app).
  A shuffling loader without a generator, and loaders with worker processes (whose Python and
  NumPy generators live in the workers), are named in a warning: never skipped silently.

Resuming mid-epoch with a shuffling DataLoader: give the loader a ``torch.Generator``; at the
start of each epoch keep ``epoch_start = generator.get_state()`` as a plain app value, and the
index of the next batch as another. On resume, ``generator.set_state(app["epoch_start"])``, build
the iterator again (``iter(loader)`` draws the same permutation) and skip the batches already
done. The generator's own saved state is the one at save time, i.e. after the permutation was
drawn, which is why the epoch-start snapshot is needed.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, MutableMapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from torchkeep.errors import IncompatibleStateError, TorchkeepError, UnsupportedValueError
from torchkeep.state._loading import apply, check, plan
from torchkeep.state._rng import RNGState

TAG = "__torchkeep__"
_PLAIN = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    torch.Tensor,
    torch.Size,
    torch.dtype,
    torch.device,
)


def _is_stateful(value: Any) -> bool:
    return callable(getattr(value, "state_dict", None)) and callable(
        getattr(value, "load_state_dict", None)
    )


def _is_plain(value: Any) -> bool:
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, dict):
        return all(_is_plain(k) and _is_plain(v) for k, v in value.items())
    if isinstance(value, list | tuple | set | frozenset):
        return all(_is_plain(v) for v in value)
    return type(value).__module__ == "numpy"


def _shuffles(loader: DataLoader[Any]) -> bool:
    sampler = getattr(loader.batch_sampler, "sampler", None) or loader.sampler
    return isinstance(sampler, RandomSampler)


def _capture_loader(key: str, loader: DataLoader[Any], has_rng: bool) -> dict[str, Any]:
    generator = loader.generator
    if generator is None and _shuffles(loader):
        where = "captured by the app's RNGState" if has_rng else "NOT captured (no RNGState)"
        warnings.warn(
            f"DataLoader {key!r} shuffles without a generator: its order comes from torch's "
            f"global generator, {where}; pass generator=torch.Generator() to the DataLoader "
            "for an order that resumes exactly",
            UserWarning,
            stacklevel=3,
        )
    if loader.num_workers > 0:
        warnings.warn(
            f"DataLoader {key!r} has {loader.num_workers} workers: the Python and NumPy random "
            "generators inside the workers are not captured; seed them from torch.initial_seed() "
            "in a worker_init_fn so they follow the loader's generator",
            UserWarning,
            stacklevel=3,
        )
    return {TAG: "dataloader", "generator": None if generator is None else generator.get_state()}


def capture_app(app: Mapping[str, Any]) -> dict[str, Any]:
    """The storable state of every entry of ``app``.

    Raises:
        UnsupportedValueError: an entry is neither stateful nor a plain value.
    """
    has_rng = any(isinstance(v, RNGState) for v in app.values())
    state: dict[str, Any] = {}
    for key, value in app.items():
        if isinstance(value, DataLoader):
            state[key] = _capture_loader(key, value, has_rng)
        elif isinstance(value, torch.Generator):
            state[key] = {TAG: "generator", "state": value.get_state()}
        elif _is_stateful(value):
            state[key] = value.state_dict()
        elif _is_plain(value):
            state[key] = value
        else:
            raise UnsupportedValueError(
                f"app entry {key!r} ({type(value).__qualname__}) has no state_dict() and is "
                "not a plain value",
                key=key,
                hint="give it state_dict()/load_state_dict() methods, or leave it out of the app",
            )
    return state


def _check_optimizer(key: str, opt: torch.optim.Optimizer, saved: Any, source: str | None) -> None:
    groups = saved.get("param_groups") if isinstance(saved, Mapping) else None
    if not isinstance(groups, list):
        raise IncompatibleStateError(
            f"app entry {key!r}: no optimizer state saved", path=source, key=key
        )
    mine = [len(g["params"]) for g in opt.param_groups]
    theirs = [len(g.get("params", ())) for g in groups if isinstance(g, Mapping)]
    if mine != theirs:
        raise IncompatibleStateError(
            f"app entry {key!r}: the optimizer has param groups of sizes {mine}, the checkpoint "
            f"{theirs} (layers frozen or unfrozen since?)",
            path=source,
            key=key,
            expected=mine,
            actual=theirs,
            hint="build the optimizer with the same parameter groups as when saving, or leave "
            "it out of the app to restore only the model",
        )


def restore_app(
    app: MutableMapping[str, Any],
    state: Mapping[str, Any],
    *,
    strict: bool = True,
    source: str | None = None,
) -> dict[str, Any]:
    """Load ``state`` into ``app`` in place; return the plain values (also written into ``app``).

    Models and optimizers are checked against the checkpoint before anything is loaded, so an
    architecture or param-group mismatch raises with the app untouched.

    Raises:
        IncompatibleStateError: an entry does not fit, or (``strict``) is missing.
    """
    missing = [k for k in app if k not in state]
    if missing and strict:
        raise IncompatibleStateError(
            f"the checkpoint has no entry for {', '.join(map(repr, missing))}",
            path=source,
            hint="restore with strict=False to load the other entries",
        )
    if missing:
        warnings.warn(
            f"not restored (absent from the checkpoint): {missing}", UserWarning, stacklevel=2
        )
    reports = {}
    for key, value in app.items():
        if key in missing:
            continue
        if isinstance(value, nn.Module):
            saved = state[key]
            if not isinstance(saved, Mapping):
                raise IncompatibleStateError(
                    f"app entry {key!r}: no state dict saved", path=source, key=key
                )
            reports[key] = plan(value, saved, source=source, entry=key)
            check(reports[key], value, strict=strict, skip_mismatched=False)
        elif isinstance(value, torch.optim.Optimizer):
            _check_optimizer(key, value, state[key], source)
    values: dict[str, Any] = {}
    for key, saved in state.items():
        value = app.get(key)
        if key not in app or not (
            _is_stateful(value) or isinstance(value, torch.Generator | DataLoader)
        ):
            app[key] = saved
            values[key] = saved
        elif isinstance(value, nn.Module):
            apply(value, saved, reports[key])
        elif isinstance(value, torch.Generator | DataLoader):
            _restore_generator(key, value, saved, source)
        else:
            try:
                app[key].load_state_dict(saved)
            except TorchkeepError:
                raise
            except Exception as exc:
                raise IncompatibleStateError(
                    f"app entry {key!r} ({type(value).__qualname__}) rejected its saved state: {exc}",
                    path=source,
                    key=key,
                ) from exc
    return values


def _restore_generator(key: str, target: Any, saved: Any, source: str | None) -> None:
    kind = saved.get(TAG) if isinstance(saved, Mapping) else None
    if isinstance(target, DataLoader):
        if kind != "dataloader":
            raise IncompatibleStateError(
                f"app entry {key!r}: no DataLoader state saved", path=source, key=key
            )
        if saved["generator"] is not None and target.generator is not None:
            target.generator.set_state(saved["generator"].clone())
        return
    if kind != "generator":
        raise IncompatibleStateError(
            f"app entry {key!r}: no generator state saved", path=source, key=key
        )
    target.set_state(saved["state"].clone())
