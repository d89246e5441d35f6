"""The ranks of a ``torch.distributed`` job as one run's writers: who commits, and meeting points.

Every rank builds its ``CheckpointManager`` the same way; :func:`current_group` tells it who it is.
Rank 0 is the run's only writer (it takes the run lock and commits manifests); the others write
only their own packs and wait for its word. The ranks meet through the job's key-value store
(the ``TCPStore`` behind ``init_process_group``), never through a collective, for two reasons:

* a meeting has a deadline (``barrier_timeout``): a rank that does not arrive in time is named in
  a :class:`~torchkeep.errors.DistributedError` on every rank that waited for it, never a hang;
* a rank reaches its meeting with a result: the small JSON of what it wrote, or the text of the
  error it got, which the others then raise rather than wait for a rank that gave up.

Keys are ``torchkeep/<run>/<instance>/<seq>/<rank>``: every rank creates its managers in the same
order and calls them the same way (as DDP requires of the model too), so counters agree.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from torchkeep.errors import DistributedError

DEFAULT_TIMEOUT = 300.0
_POLL = 0.05
_instances: dict[str, int] = {}


@dataclass
class RankGroup:
    """This process's rank among ``world_size`` ranks, and the store they meet through."""

    rank: int
    world_size: int
    store: Any = None
    timeout: float = DEFAULT_TIMEOUT
    prefix: str = ""
    _seq: int = field(default=0, repr=False)
    broken: bool = field(default=False, repr=False)
    """A meeting failed (a rank missing or failed): later ones, close()'s, would wait in vain."""

    @property
    def writer(self) -> bool:
        """Whether this rank commits (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and self.store is not None

    def next_key(self, what: str) -> str:
        self._seq += 1
        return f"{self.prefix}/{self._seq}-{what}"

    def announce(self) -> None:
        """Say that this rank has built its manager (a missing rank's error tells whether)."""
        self.post(f"{self.prefix}/joined", {})

    def _joined(self, rank: int) -> bool:
        try:
            return bool(self.store.check([f"{self.prefix}/joined/{rank}"]))
        except (RuntimeError, OSError):
            return True  # the store is gone: say nothing more than "did not arrive"

    def post(self, key: str, payload: dict[str, Any]) -> None:
        """Arrive at meeting ``key`` with ``payload`` (JSON)."""
        try:
            self.store.set(f"{key}/{self.rank}", json.dumps(payload))
        except (RuntimeError, OSError) as exc:
            raise self._lost(key, exc) from exc

    def gather(self, key: str, ranks: list[int], what: str) -> dict[int, dict[str, Any]]:
        """The payloads of ``ranks`` at meeting ``key``, once all have arrived.

        Raises:
            DistributedError: a rank did not arrive within the timeout (named), or arrived
                with an error (its message), or the store is gone (rank 0 died).
        """
        deadline = time.monotonic() + self.timeout
        pending = list(ranks)
        got: dict[int, dict[str, Any]] = {}
        while True:
            try:
                for r in list(pending):
                    if self.store.check([f"{key}/{r}"]):
                        got[r] = json.loads(self.store.get(f"{key}/{r}"))
                        pending.remove(r)
            except (RuntimeError, OSError) as exc:
                raise self._lost(key, exc) from exc
            failed = {r: p["error"] for r, p in got.items() if p.get("error")}
            if failed:
                self.broken = True
                r, text = sorted(failed.items())[0]
                raise DistributedError(
                    f"rank {r} failed {what}: {text}",
                    key=f"rank {r}",
                    hint="the error above is that rank's; nothing was committed for this step",
                )
            if not pending:
                return got
            if time.monotonic() > deadline:
                self.broken = True
                never = [r for r in pending if not self._joined(r)]
                if never:
                    names = ", ".join(map(str, never))
                    raise DistributedError(
                        f"rank{'s' if len(never) > 1 else ''} {names} of {self.world_size} never "
                        f"built a CheckpointManager for this run (waited {self.timeout:g} s "
                        f"{what})",
                        key=f"rank {never[0]}",
                        hint="nothing was committed for this step. In a torch.distributed job "
                        "every rank builds the manager the same way and calls save() with the "
                        "same steps; code that checkpoints on one rank only passes "
                        "CheckpointManager(..., distributed=False) there",
                    )
                names = ", ".join(map(str, pending))
                raise DistributedError(
                    f"rank{'s' if len(pending) > 1 else ''} {names} did not arrive {what} within "
                    f"{self.timeout:g} s (of {self.world_size} ranks; crashed or stuck?)",
                    key=f"rank {pending[0]}",
                    hint="nothing was committed for this step; check that rank's log, or raise "
                    "CheckpointManager(barrier_timeout=...) if it is only slow. In a job every "
                    "rank builds the manager and calls save() with the same steps",
                )
            time.sleep(_POLL)

    def _lost(self, key: str, exc: BaseException) -> DistributedError:
        return DistributedError(
            f"rank {self.rank} lost the job's store while meeting at {key.rsplit('/', 1)[-1]} "
            f"({exc}); rank 0 (which hosts it) has probably died",
            key=f"rank {self.rank}",
            hint="nothing was committed for this step; restart the job, it resumes from the "
            "last committed checkpoint",
        )


def current_group(
    root: str, timeout: float | None, *, meet: bool = True, alone: bool = False
) -> RankGroup:
    """The group of this process: ranks of the default process group, or a world of 1.

    ``meet=False``: the ranks, but no store (a read-only manager waits for no one).
    ``alone=True``: a world of 1 even inside a job (``CheckpointManager(distributed=False)``).
    """
    limit = DEFAULT_TIMEOUT if timeout is None else float(timeout)
    if limit <= 0:
        from torchkeep.errors import InvalidArgumentError

        raise InvalidArgumentError(f"barrier_timeout must be positive, not {timeout!r}")
    if alone:
        return RankGroup(rank=0, world_size=1, timeout=limit)
    try:
        import torch.distributed as dist
        from torch.distributed import distributed_c10d as c10d
    except ImportError:  # torch built without distributed
        return RankGroup(rank=0, world_size=1, timeout=limit)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return RankGroup(rank=0, world_size=1, timeout=limit)
    if not meet:
        return RankGroup(rank=dist.get_rank(), world_size=dist.get_world_size(), timeout=limit)
    where = os.path.abspath(root)
    _instances[where] = instance = _instances.get(where, 0) + 1
    return RankGroup(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        store=c10d._get_default_store(),
        timeout=limit,
        prefix=f"torchkeep/{where}/{instance}",
    )
