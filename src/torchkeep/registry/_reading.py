"""The registry's reports built from its index: lineage, comparisons, exported records."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import BinaryIO

from torchkeep.errors import CheckpointNotFoundError
from torchkeep.format import INDEX_FILE, RegistryIndex, tensors_by_path
from torchkeep.registry._records import (
    AliasMove,
    Comparison,
    Lineage,
    RegistryReport,
    compare_tensor,
)
from torchkeep.storage import local_path, storage_for


class Reading(RegistryIndex):
    """What :class:`Registry` reads beyond single versions (a base class, for module size)."""

    def alias_history(self, name: str, alias: str) -> list[AliasMove]:
        """Every move of ``alias``, oldest first.

        Raises:
            CheckpointNotFoundError: the alias was never set.
        """
        rows = self.conn.execute(
            "SELECT name, alias, from_version, to_version, user, host, pid, time "
            "FROM alias_history WHERE name = ? AND alias = ? ORDER BY id",
            (name, alias),
        ).fetchall()
        if not rows:
            self.versions(name)  # an unknown name says so
            raise CheckpointNotFoundError(
                f"model {name!r} has no alias {alias!r}",
                path=str(self.root),
                key=alias,
                hint=f"aliases: {', '.join(self.aliases(name)) or 'none'}",
            )
        keys = ("name", "alias", "from_version", "to_version", "user", "host", "pid", "time")
        return [AliasMove(**dict(zip(keys, r, strict=True))) for r in rows]

    def verify(self, name: str | None = None, version: str | None = None) -> RegistryReport:
        """Recompute every tensor hash and the fingerprint of a version, of every version of
        ``name``, or (with no argument) of the whole registry; also checks the index itself."""
        problems: list[str] = []
        (status,) = self.conn.execute("PRAGMA quick_check").fetchone()
        if status != "ok":
            problems.append(f"{self.root / INDEX_FILE}: {status}")
        if version is not None and name is not None:
            chosen = [self.resolve(name, str(version))]
        elif name is not None:
            chosen = self.versions(name)
        else:
            chosen = [v for n in self.names() for v in self.versions(n)]
        for v in chosen:
            problems.extend(self.check(v))
        return RegistryReport(
            registry=str(self.root),
            versions=len(chosen),
            tensors=sum(v.tensors for v in chosen),
            problems=tuple(problems),
        )

    def lineage(self, name: str, version: str) -> Lineage:
        """A version's ancestors (parent first) and descendants (children first)."""
        v = self.resolve(name, str(version))
        ancestors, missing, seen = [], [], {f"{v.name}@{v.version}"}
        parent = v.parent
        while parent and parent not in seen:
            seen.add(parent)
            other, _, which = parent.rpartition("@")
            try:
                p = self.resolve(other, which)
            except CheckpointNotFoundError:
                missing.append(parent)
                break
            ancestors.append(p)
            parent = p.parent
        descendants, queue = [], [f"{v.name}@{v.version}"]
        while queue:
            ref = queue.pop(0)
            for child_name, child in self.conn.execute(
                "SELECT name, version FROM versions WHERE parent = ? ORDER BY number", (ref,)
            ).fetchall():
                key = f"{child_name}@{child}"
                if key not in seen:
                    seen.add(key)
                    descendants.append(self.resolve(child_name, child))
                    queue.append(key)
        return Lineage(
            version=v,
            ancestors=tuple(ancestors),
            descendants=tuple(descendants),
            missing=tuple(missing),
        )

    def export_metadata(self, name: str, version: str, path: str | os.PathLike[str]) -> Path:
        """Write a version's record (config, metrics, history, system, fingerprint, aliases,
        lineage and tensor table) as JSON to ``path``; returns the path."""
        v = self.resolve(name, str(version))
        m = self.manifest(v)
        doc = {
            **v.to_dict(),
            "lineage": self.lineage(name, v.version).to_dict() | {"version": v.reference},
            "tensor_table": {
                k: {"dtype": r.dtype, "shape": list(r.shape), "nbytes": r.nbytes, "hash": r.hash}
                for k, r in sorted(m.tensors.items())
            },
        }
        text = json.dumps(doc, indent=2).encode()
        dest = local_path(path)
        storage_for(dest).write_atomic(str(dest), lambda f: _write(f, text))
        return dest

    def compare(self, name: str, v1: str, v2: str) -> Comparison:
        """Per-tensor comparison of two versions (relative L2, cosine, share changed, frozen)."""
        a, b = self.resolve(name, str(v1)), self.resolve(name, str(v2))
        ta, tb = tensors_by_path(self.load(a)), tensors_by_path(self.load(b))
        both = [k for k in ta if k in tb]
        return Comparison(
            name=name,
            v1=a.version,
            v2=b.version,
            tensors=tuple(compare_tensor(k, ta[k], tb[k]) for k in both),
            only_in_v1=tuple(k for k in ta if k not in tb),
            only_in_v2=tuple(k for k in tb if k not in ta),
        )


def _write(f: BinaryIO, data: bytes) -> None:
    f.write(data)
