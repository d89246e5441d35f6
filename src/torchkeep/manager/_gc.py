"""Deleting a run's files: retention's manifests, unreferenced packs, crashed writers' leftovers.

The order is what keeps readers safe (see ``format/_run``): manifests go first, then the packs
that no remaining manifest uses. Only files the run wrote are ever deleted (a pack's name *and*
a pack's header, ``format._run.is_pack``), and every delete goes through a descriptor of the
real folder, so a link swapped in for ``packs/`` or ``checkpoints/`` cannot send it elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from torchkeep.errors import StorageError
from torchkeep.format import (
    MANIFEST_DIR,
    PACK_DIR,
    Manifest,
    check_layout,
    is_pack,
    is_pack_name,
    manifest_name,
)
from torchkeep.manager._retention import RetentionPolicy, select
from torchkeep.storage import storage_error, storage_for


def collect_packs(
    root: Path, manifests: Iterable[Manifest], released: Iterable[Manifest] = ()
) -> None:
    """Delete packs that no committed manifest refers to, and only packs this run wrote.

    A file is deleted only when its name is a pack's name, it is a regular file (a link is never
    followed, nor removed), and its header says it is a torchkeep pack: a name alone is no proof.
    The storage deletes through a descriptor of the real ``packs/`` folder, so a link swapped in
    for the folder cannot send the deletes elsewhere.
    """
    used = {ref.pack for m in manifests for ref in m.tensors.values()}
    folder = str(root / PACK_DIR)
    store = storage_for(folder)
    unused = [name for name in store.list(folder) if name not in used and is_pack_name(name)]
    # Packs of checkpoints deleted just now were committed: nobody can be about to commit them.
    # Any other unreferenced pack may be a writer's that is still about to commit (a remote
    # writer whose lease expired): the store keeps those for its grace period.
    freed = {ref.pack for m in released for ref in m.tensors.values()}
    now = [name for name in unused if name in freed]
    later = [name for name in unused if name not in freed]
    if now:
        store.delete_files(folder, now, check=is_pack, action="delete unused packs")
    if later:
        store.delete_files(folder, later, check=is_pack, action="delete unused packs", grace=True)


def delete_manifests(root: Path, manifests: Iterable[Manifest]) -> None:
    """Delete committed manifests (retention), through the real ``checkpoints/`` folder."""
    folder = str(root / MANIFEST_DIR)
    names = [manifest_name(manifest.step) for manifest in manifests]
    storage_for(folder).delete_files(folder, names, action="delete pruned checkpoints")


def sweep(root: Path, manifests: Iterable[Manifest]) -> None:
    """Remove what crashed writers left: temporary files and unreferenced packs.

    Refuses a run whose folders are links first: the sweep must never reach outside the run.
    """
    check_layout(root)
    store = storage_for(root)
    for folder in (root, root / MANIFEST_DIR, root / PACK_DIR):
        store.sweep_temporaries(str(folder))
    collect_packs(root, manifests)


class Retainer:
    """Applies a retention policy to a run's manifests: deletes what it drops, then collects.

    ``due`` remembers that packs may be unreferenced (a checkpoint deleted or saved again, or a
    sweep that failed): a collection that fails leaves it set, and the next call retries.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.due = False

    def apply(
        self,
        manifests: dict[int, Manifest],
        policy: RetentionPolicy,
        replaced: Manifest | None = None,
    ) -> dict[int, tuple[str, ...]]:
        """Delete what ``policy`` does not keep (and drop it from ``manifests``); return why
        each kept step is kept.

        A failure raises ``StorageError`` and leaves the rest for the next call (a manifest not
        deleted stays listed; packs stay until collected).
        """
        kept = select([(s, m.metrics) for s, m in manifests.items()], policy)
        doomed = sorted(set(manifests) - set(kept))
        if doomed or replaced is not None:
            self.due = True
        folder = self.root / MANIFEST_DIR
        try:
            released = [manifests[step] for step in doomed]
            released += [replaced] if replaced is not None else []
            if doomed:
                # The manifests go first: from then on nothing refers to their packs.
                delete_manifests(self.root, [manifests[step] for step in doomed])
                for step in doomed:
                    del manifests[step]
            if self.due:
                folder = self.root / PACK_DIR
                collect_packs(self.root, manifests.values(), released)
                self.due = False
        except StorageError:
            raise
        except OSError as exc:
            raise storage_error(exc, folder, "delete unused checkpoint files") from exc
        return kept
