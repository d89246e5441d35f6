"""Deleting a run's files: retention's manifests, unreferenced packs, crashed writers' leftovers.

The order is what keeps readers safe (see ``format/_run``): manifests go first, then the packs
that no remaining manifest uses. Only files the run wrote are ever deleted (a pack's name *and*
a pack's header, ``format._run.is_pack``), and every delete goes through a descriptor of the
real folder, so a link swapped in for ``packs/`` or ``checkpoints/`` cannot send it elsewhere.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
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
from torchkeep.format._confine import open_folder
from torchkeep.manager._retention import RetentionPolicy, select
from torchkeep.storage._local import storage_error, sweep_temporaries


def collect_packs(root: Path, manifests: Iterable[Manifest]) -> None:
    """Delete packs that no committed manifest refers to, and only packs this run wrote.

    A file is deleted only when its name is a pack's name, it is a regular file (a link is never
    followed, nor removed), and its header says it is a torchkeep pack: a name alone is no proof.
    Deletes go through a descriptor of the real ``packs/`` folder, so a link swapped in for the
    folder cannot send them elsewhere.
    """
    used = {ref.pack for m in manifests for ref in m.tensors.values()}
    try:
        folder = open_folder(root, PACK_DIR)
    except FileNotFoundError:
        return
    try:
        for name in os.listdir(folder):
            if name in used or not is_pack_name(name):
                continue
            try:
                st = os.stat(name, dir_fd=folder, follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and is_pack(folder, name):
                    os.unlink(name, dir_fd=folder)
            except FileNotFoundError:
                continue
        _fsync_folder(folder)
    except OSError as exc:
        raise storage_error(exc, root / PACK_DIR, "delete unused packs") from exc
    finally:
        os.close(folder)


def delete_manifests(root: Path, manifests: Iterable[Manifest]) -> None:
    """Delete committed manifests (retention), through the real ``checkpoints/`` folder."""
    folder = open_folder(root, MANIFEST_DIR)
    try:
        for manifest in manifests:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(manifest_name(manifest.step), dir_fd=folder)
        _fsync_folder(folder)
    except OSError as exc:
        raise storage_error(exc, root / MANIFEST_DIR, "delete pruned checkpoints") from exc
    finally:
        os.close(folder)


def _fsync_folder(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:  # as storage.fsync_dir: some filesystems cannot fsync a directory
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise


def sweep(root: Path, manifests: Iterable[Manifest]) -> None:
    """Remove what crashed writers left: temporary files and unreferenced packs.

    Refuses a run whose folders are links first: the sweep must never reach outside the run.
    """
    check_layout(root)
    for folder in (root, root / MANIFEST_DIR, root / PACK_DIR):
        for entry in os.listdir(folder):
            if ".tkp-" in entry and entry.startswith("."):
                sweep_temporaries(folder / entry.split(".tkp-")[0][1:])
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
            if doomed:
                # The manifests go first: from then on nothing refers to their packs.
                delete_manifests(self.root, [manifests[step] for step in doomed])
                for step in doomed:
                    del manifests[step]
            if self.due:
                folder = self.root / PACK_DIR
                collect_packs(self.root, manifests.values())
                self.due = False
        except StorageError:
            raise
        except OSError as exc:
            raise storage_error(exc, folder, "delete unused checkpoint files") from exc
        return kept
