"""FSDP2 / DTensor state saved in shards through DCP, and restored at any world size.

An app is sharded when one of its models holds ``DTensor`` parameters (``fully_shard``); then
its models and optimizers go through DCP (``get_model_state_dict`` /
``get_optimizer_state_dict``: DTensors, optimizer state keyed by parameter name), every rank
writing only its own shards (``_dcp_writer.py``), while its other entries (schedulers, plain
values, per-rank RNG and loaders) take the DDP path (``_ddp.py``). Rank 0 merges every rank's
part (DCP entries, shard refs with hashes, pack digests) into one manifest: the commit.

Restoring runs ``dcp.load`` with torchkeep's reader (``_dcp_reader.py``) on the app's current
state dict, so DCP's planner reshards to the current world size, then ``set_*_state_dict``.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchkeep.errors import IncompatibleStateError, InvalidArgumentError, TorchkeepError
from torchkeep.format import Manifest, RunReader, TensorRef

Hashes = Callable[[dict[str, torch.Tensor]], dict[str, str]]


def _dtensor() -> Any:
    """``DTensor``, if anything imported it (no DTensor exists before): importing DCP and
    DTensor costs seconds, which ``import torchkeep`` must not pay."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def sharded_keys(app: Mapping[str, Any]) -> list[str]:
    """The entries saved through DCP: every model and optimizer, when a model holds DTensors."""
    DTensor = _dtensor()
    if DTensor is None or not any(
        isinstance(v, nn.Module) and any(isinstance(p, DTensor) for p in v.parameters())
        for v in app.values()
    ):
        return []
    return sorted(k for k, v in app.items() if isinstance(v, nn.Module | torch.optim.Optimizer))


def _owner(app: Mapping[str, Any], key: str, opt: torch.optim.Optimizer) -> nn.Module:
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    for value in app.values():
        if isinstance(value, nn.Module) and any(id(p) in params for p in value.parameters()):
            return value
    raise InvalidArgumentError(
        f"optimizer {key!r} optimizes no parameter of the app's models",
        key=key,
        hint="put the model it trains in the same app dict",
    )


def dcp_state(app: Mapping[str, Any], keys: list[str]) -> dict[str, Any]:
    """The DCP state dict of the sharded entries (DTensors, parameter names as keys)."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    state: dict[str, Any] = {}
    for key in keys:
        value = app[key]
        if isinstance(value, nn.Module):
            state[key] = get_model_state_dict(value)
        else:
            state[key] = get_optimizer_state_dict(_owner(app, key, value), value)
    return state


def _unwrap(exc: BaseException) -> BaseException:
    """DCP wraps a rank's failure in ``CheckpointException``: the torchkeep error inside."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict):
        for inner in failures.values():
            found = inner[0] if isinstance(inner, tuple) else inner
            if isinstance(found, TorchkeepError):
                return found
    return exc


def save_shards(
    root: Path,
    step: int,
    rank: int,
    app: Mapping[str, Any],
    keys: list[str],
    hashes: Hashes,
    *,
    defer: bool = False,
) -> Callable[[], dict[str, Any]]:
    """Write this rank's shards of ``keys`` (one pack, durable); returns what gives its part
    as JSON. With ``defer`` only a host copy is made here (the staging an async save waits
    for), and the returned call writes it (on the background thread)."""
    state = dcp_state(app, keys)
    if defer:
        staged = _host_copy(state)
        return lambda: _write(root, step, rank, staged, hashes)
    part = _write(root, step, rank, state, hashes)
    return lambda: part


def _host_copy(value: Any) -> Any:
    """A copy of a DCP state dict that training may not change: tensors copied (a DTensor's
    local shard, kept a DTensor of the same mesh and placements), containers rebuilt."""
    DTensor = _dtensor()
    if DTensor is not None and isinstance(value, DTensor):
        local = value.to_local().detach().to("cpu", copy=True)
        return DTensor.from_local(
            local,
            value.device_mesh,
            value.placements,
            run_check=False,
            shape=value.shape,
            stride=value.stride(),
        )
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, Mapping):
        return {k: _host_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_host_copy(v) for v in value)
    return value


def _write(
    root: Path, step: int, rank: int, state: dict[str, Any], hashes: Hashes
) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    from torchkeep.distributed._dcp_writer import PackWriter

    writer = PackWriter(root, step, rank, hashes, skip_replicated=rank > 0)
    try:
        with warnings.catch_warnings():  # "assuming ... a single process": on purpose
            warnings.simplefilter("ignore", UserWarning)
            dcp_save(state, storage_writer=writer, no_dist=True)
    except BaseException as exc:  # DCP's CheckpointException is a BaseException
        inner = _unwrap(exc)
        if inner is not exc:
            raise inner from exc
        raise
    part = writer.part
    return {
        "entries": part.entries,
        "paths": part.paths,
        "tensors": {k: _fields(r) for k, r in part.refs.items()},
        "packs": {name: [n, h] for name, (n, h) in part.packs.items()},
    }


def merge(parts: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Every rank's part (rank 0 first) as the manifest's ``sharded`` doc, refs and packs."""
    entries: dict[str, Any] = {}
    paths: dict[str, Any] = {}
    tensors: dict[str, Any] = {}
    packs: dict[str, Any] = {}
    for part in parts:
        paths.update(part["paths"])
        tensors.update(part["tensors"])
        packs.update(part["packs"])
        for fqn, entry in part["entries"].items():
            if fqn not in entries:
                entries[fqn] = entry
            elif "tensor" in entry and "tensor" in entries[fqn]:
                chunks = entries[fqn]["tensor"]["chunks"]
                have = {tuple(c["offsets"]) for c in chunks}
                chunks.extend(
                    c for c in entry["tensor"]["chunks"] if tuple(c["offsets"]) not in have
                )
    for entry in entries.values():
        if "tensor" in entry:
            entry["tensor"]["chunks"].sort(key=lambda c: c["offsets"])
    return {"entries": entries, "paths": paths}, tensors, packs


def sharded_app_keys(doc: Mapping[str, Any]) -> list[str]:
    """The app entries a sharded checkpoint holds in shards."""
    paths = doc.get("paths", {})
    return sorted({str(paths.get(fqn, [fqn])[0]) for fqn in doc.get("entries", {})})


def restore_shards(
    reader: RunReader, manifest: Manifest, app: Mapping[str, Any], *, verify: bool
) -> list[str]:
    """Load the sharded entries of ``manifest`` into ``app``'s models and optimizers, resharded
    to this job's world size; the keys restored."""
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    from torchkeep.distributed._dcp_reader import PackReader

    assert manifest.sharded is not None
    keys = sharded_app_keys(manifest.sharded)
    missing = [k for k in keys if k not in app]
    if missing:
        raise IncompatibleStateError(
            f"the checkpoint holds {', '.join(map(repr, missing))} in shards, which the app lacks",
            path=str(manifest.path),
            key=missing[0],
            hint="pass an app with the same entries as the one saved",
        )
    state = dcp_state(app, keys)
    try:
        with warnings.catch_warnings():  # "assuming ... a single process": on purpose
            warnings.simplefilter("ignore", UserWarning)
            dcp_load(
                state, storage_reader=PackReader(reader, manifest, verify=verify), no_dist=True
            )
    except BaseException as exc:  # DCP's CheckpointException is a BaseException
        if not isinstance(exc, Exception) and type(exc).__name__ != "CheckpointException":
            raise
        inner = _unwrap(exc)
        if isinstance(inner, TorchkeepError):
            raise inner from exc
        raise IncompatibleStateError(
            f"the sharded state does not fit the app: {inner}",
            path=str(manifest.path),
            hint="restore into the same model and optimizer classes that were saved",
        ) from exc
    for key in keys:
        value = app[key]
        if isinstance(value, nn.Module):
            set_model_state_dict(value, state[key])
        else:
            set_optimizer_state_dict(_owner(app, key, value), value, state[key])
    return keys


def _fields(ref: TensorRef) -> dict[str, Any]:
    return {
        "pack": ref.pack,
        "key": ref.key,
        "dtype": ref.dtype,
        "shape": list(ref.shape),
        "nbytes": ref.nbytes,
        "hash": ref.hash,
    }
