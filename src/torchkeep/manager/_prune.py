"""``CheckpointManager.prune``: retention on demand, with rules other than the run's own.

A mixin of the manager, so that ``_manager.py`` stays one screenful of concerns; it uses only the
manager's manifests, policy and retainer.
"""

from __future__ import annotations

from typing import Any, Literal, overload

from torchkeep.format import Manifest
from torchkeep.manager._aftercommit import AfterCommit
from torchkeep.manager._retention import PrunePlan, RetentionPolicy, plan


class Pruning:
    """The ``prune`` method of :class:`~torchkeep.CheckpointManager`."""

    read_only: bool
    policy: RetentionPolicy
    _manifests: dict[int, Manifest]
    _after: AfterCommit

    def _check_writable(self) -> None:
        raise NotImplementedError

    def wait(self) -> Any:
        raise NotImplementedError

    def _refresh(self) -> None:
        raise NotImplementedError

    @overload
    def prune(
        self,
        *,
        keep_last: int | None = ...,
        keep_best: int | None = ...,
        keep_every: int | None = ...,
        dry_run: Literal[False] = ...,
    ) -> list[int]: ...

    @overload
    def prune(
        self,
        *,
        keep_last: int | None = ...,
        keep_best: int | None = ...,
        keep_every: int | None = ...,
        dry_run: Literal[True],
    ) -> PrunePlan: ...

    def prune(
        self,
        *,
        keep_last: int | None = None,
        keep_best: int | None = None,
        keep_every: int | None = None,
        dry_run: bool = False,
    ) -> list[int] | PrunePlan:
        """Delete checkpoints that these rules (plus the latest and the best) do not keep.

        The run's stored policy is not changed.

        Returns:
            The steps deleted; with ``dry_run``, the :class:`PrunePlan` instead (each kept step
            with why, the steps that would go), and nothing is deleted. A dry run also works on
            a manager opened ``read_only``: it only reads.
        """
        if not (dry_run and self.read_only):
            self._check_writable()
        self.wait()
        self._refresh()
        policy = RetentionPolicy(
            keep_last=keep_last,
            keep_best=keep_best,
            keep_every=keep_every,
            monitor=self.policy.monitor,
            mode=self.policy.mode,
        )
        planned = plan([(s, m.metrics) for s, m in self._manifests.items()], policy)
        if dry_run:
            return planned
        self._after.retainer.apply(self._manifests, policy)
        return planned.delete
