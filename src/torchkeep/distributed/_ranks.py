"""Per-rank state: what each rank keeps for itself, how it is stored, and how it comes back.

Under DDP the model and optimizer are the same on every rank, but each rank's RNG, sampler and
DataLoader position are its own. An app entry is per-rank when it is an ``RNGState``, a
``torch.Generator``, a ``DataLoader`` or a ``Sampler`` (a ``DistributedSampler`` with
``state_dict``, say), or when its key is listed in ``CheckpointManager(per_rank=...)``.

A checkpoint saved by W > 1 ranks holds, beside the shared entries, one reserved entry::

    "__torchkeep_ranks__": {"world_size": W, "keys": ["loader", "rng"],
                            "0": {"loader": ..., "rng": ...}, "1": {...}, ...}

(a checkpoint of one process holds its per-rank entries as ordinary entries). Restoring at the
same world size gives each rank its own. At another world size the ``rank_state`` policy decides:

* ``"strict"`` (the default): refuse, saying what differs (world sizes and entries);
* ``"reset"``: leave the per-rank entries as the app holds them (a warning names them);
* ``"wrap"``: rank r takes what saved rank ``r % W`` had (2 -> 1: rank 0's state).

Nothing is dropped silently: the entries not restored are always named.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any, Literal, get_args

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler

from torchkeep.errors import IncompatibleStateError, InvalidArgumentError, TorchkeepWarning
from torchkeep.state import RNGState, restore_app

RANKS_KEY = "__torchkeep_ranks__"
RankStatePolicy = Literal["strict", "reset", "wrap"]
POLICIES: tuple[str, ...] = get_args(RankStatePolicy)


def check_policy(policy: str) -> RankStatePolicy:
    if policy not in POLICIES:
        raise InvalidArgumentError(
            f"rank_state must be one of {', '.join(map(repr, POLICIES))}, not {policy!r}",
            expected=list(POLICIES),
            actual=policy,
        )
    return policy  # type: ignore[return-value]  # checked against the Literal's values above


def is_rank_local(value: Any) -> bool:
    """Whether an app entry is a rank's own state (RNG, generator, loader, sampler)."""
    return isinstance(value, RNGState | torch.Generator | DataLoader | Sampler)


def rank_keys(app: Mapping[str, Any], per_rank: Iterable[str] = ()) -> list[str]:
    """The per-rank entries of ``app``, sorted."""
    named = set(per_rank)
    missing = sorted(named - set(app))
    if missing:
        raise InvalidArgumentError(
            f"per_rank names {', '.join(map(repr, missing))}, which the app does not hold",
            hint=f"the app holds {', '.join(map(repr, app)) or 'nothing'}",
        )
    return sorted(k for k, v in app.items() if k in named or is_rank_local(v))


def ranked_view(
    state: Mapping[str, Any],
    app: Mapping[str, Any],
    *,
    rank: int,
    world_size: int,
    policy: RankStatePolicy,
    per_rank: Iterable[str] = (),
    source: str | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """The state for this rank to restore, and the per-rank entries left as they are.

    Raises:
        IncompatibleStateError: the world size changed and ``policy`` is ``"strict"``.
    """
    shared = {k: v for k, v in state.items() if k != RANKS_KEY}
    block = state.get(RANKS_KEY)
    local = rank_keys(app, per_rank)
    if isinstance(block, Mapping):
        saved_world = block.get("world_size")
        saved_keys = list(block.get("keys") or [])
        if type(saved_world) is not int or saved_world < 1:
            raise IncompatibleStateError(
                f"the per-rank state says world size {saved_world!r}", path=source, key=RANKS_KEY
            )
        per_saved = {r: block.get(str(r)) for r in range(saved_world)}
    else:  # saved by one process: its per-rank entries are ordinary ones
        saved_world = 1
        saved_keys = [k for k in local if k in shared]
        per_saved = {0: {k: shared.pop(k) for k in saved_keys}}
    if saved_world == world_size:
        mine = per_saved[rank]
    elif not saved_keys:  # nothing was saved per rank: no policy to apply
        mine = per_saved.get(0) or {}
    elif policy == "strict":
        raise IncompatibleStateError(
            f"the checkpoint was saved by {saved_world} rank{'s' * (saved_world > 1)}, each with "
            f"its own {_names(saved_keys)}; this job has {world_size} "
            f"rank{'s' * (world_size > 1)}, so there is no saved state for rank {rank}"
            if rank >= saved_world
            else f"the checkpoint was saved by {saved_world} ranks, each with its own "
            f"{_names(saved_keys)}; this job has {world_size}",
            path=source,
            key=RANKS_KEY,
            expected=f"world size {saved_world}",
            actual=f"world size {world_size}",
            hint="restore with rank_state='reset' (keep each rank's current RNG and loader "
            "state) or rank_state='wrap' (rank r takes saved rank r % "
            f"{saved_world}), or resume with {saved_world} ranks",
        )
    elif policy == "wrap":
        mine = per_saved[rank % saved_world]
    else:  # reset: the app's per-rank entries keep their state (named in a warning)
        return shared, local
    if not isinstance(mine, Mapping):
        raise IncompatibleStateError(
            f"the checkpoint holds no per-rank state for rank {rank}", path=source, key=RANKS_KEY
        )
    return {**shared, **mine}, []  # an entry it lacks is restore_app's to report


def restore_ranked(
    app: MutableMapping[str, Any],
    state: Mapping[str, Any],
    *,
    rank: int,
    world_size: int,
    policy: RankStatePolicy,
    per_rank: Iterable[str] = (),
    strict: bool = True,
    source: str | None = None,
) -> dict[str, Any]:
    """:func:`restore_app` for one rank of ``world_size``, per-rank state by ``policy``."""
    view, left = ranked_view(
        state,
        app,
        rank=rank,
        world_size=world_size,
        policy=policy,
        per_rank=per_rank,
        source=source,
    )
    if left:
        warnings.warn(
            f"rank {rank}: per-rank {_names(left)} not restored (rank_state={policy!r}, the "
            f"checkpoint was saved at another world size); they keep their current state",
            TorchkeepWarning,
            stacklevel=3,
        )
    sub = unwrapped({k: v for k, v in app.items() if k not in left})
    values = restore_app(sub, view, strict=strict, source=source)
    for key, value in values.items():  # plain values go back into the caller's app
        if key in app:
            app[key] = value
    return values


def unwrapped(app: Mapping[str, Any]) -> dict[str, Any]:
    """``app`` with its DDP-wrapped models replaced by the models inside (saved unwrapped)."""
    return {k: v.module if isinstance(v, DistributedDataParallel) else v for k, v in app.items()}


def _names(keys: Iterable[str]) -> str:
    keys = list(keys)
    return ", ".join(map(repr, keys)) if keys else "nothing"
