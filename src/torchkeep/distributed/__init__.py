"""Distributed training: the ranks of a ``torch.distributed`` job writing one run.

``_group.py`` (who this rank is, meeting points with a deadline through the job's store),
``_ranks.py`` (per-rank state and the ``rank_state`` policy), ``_ddp.py`` (the save protocol of
DDP: every rank's part, rank 0's single commit). The manager calls :class:`RankedRun` at a few
narrow points; outside a distributed job (or with one rank) it changes nothing.
"""

from torchkeep.distributed._ddp import RankedRun
from torchkeep.distributed._group import DEFAULT_TIMEOUT, RankGroup, current_group
from torchkeep.distributed._ranks import (
    POLICIES,
    RANKS_KEY,
    RankStatePolicy,
    is_rank_local,
    ranked_view,
    restore_ranked,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "POLICIES",
    "RANKS_KEY",
    "RankGroup",
    "RankStatePolicy",
    "RankedRun",
    "current_group",
    "is_rank_local",
    "ranked_view",
    "restore_ranked",
]
