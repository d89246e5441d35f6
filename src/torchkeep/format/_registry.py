"""A model registry on disk, the read side: its layout, its index schema, references, reading.

::

    REGISTRY/
      torchkeep_registry.json         the registry: kind and format version
      index.sqlite (-wal, -shm)       the index (SQLite, WAL): versions, tensors, aliases, history
      packs/<time>-<rand>.safetensors immutable tensor packs, written as a run's are (write_pack)

A version is a row of ``versions`` and its tensor table in ``tensors`` (pack, key, dtype, shape,
nbytes, xxh3-128 hash), the same table a run's manifest holds, so that its state is rebuilt by the
run's reader (:class:`RunReader` ``load``) from the skeleton. A tensor whose bytes some version
already stores is referenced, not written again. Writing is ``torchkeep.registry``'s (one layer
up); this module is what lower layers need to resolve ``REGISTRY/NAME@VERSION_OR_ALIAS`` wherever
a checkpoint reference is accepted (``open_source``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from torchkeep.errors import CheckpointNotFoundError, CorruptCheckpointError, TorchkeepError
from torchkeep.format._hash import tensor_hash
from torchkeep.format._location import MapLocation
from torchkeep.format._run import Manifest, RunReader, TensorRef
from torchkeep.storage import connect_sqlite, local_path

REGISTRY_FILE = "torchkeep_registry.json"
REGISTRY_KIND = "torchkeep-registry"
INDEX_FILE = "index.sqlite"
PACK_DIR = "packs"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", re.ASCII)
SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL, number INTEGER NOT NULL, version TEXT NOT NULL,
    fingerprint TEXT NOT NULL, created REAL NOT NULL, parent TEXT,
    record TEXT NOT NULL, skeleton TEXT NOT NULL,
    PRIMARY KEY (name, version), UNIQUE (name, number));
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, last INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS tensors (
    name TEXT NOT NULL, version TEXT NOT NULL, key TEXT NOT NULL,
    pack TEXT NOT NULL, pack_key TEXT NOT NULL, dtype TEXT NOT NULL, shape TEXT NOT NULL,
    nbytes INTEGER NOT NULL, hash TEXT NOT NULL,
    PRIMARY KEY (name, version, key),
    FOREIGN KEY (name, version) REFERENCES versions (name, version) ON DELETE CASCADE);
CREATE INDEX IF NOT EXISTS tensors_by_hash ON tensors (hash, dtype, shape);
CREATE INDEX IF NOT EXISTS tensors_by_pack ON tensors (pack);
CREATE TABLE IF NOT EXISTS aliases (
    name TEXT NOT NULL, alias TEXT NOT NULL, version TEXT NOT NULL, moved REAL NOT NULL,
    PRIMARY KEY (name, alias),
    FOREIGN KEY (name, version) REFERENCES versions (name, version));
CREATE TABLE IF NOT EXISTS alias_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, alias TEXT NOT NULL,
    from_version TEXT, to_version TEXT, user TEXT, host TEXT, pid INTEGER, time REAL NOT NULL);
CREATE TABLE IF NOT EXISTS pending (
    token TEXT NOT NULL, pack TEXT NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL,
    time REAL NOT NULL, PRIMARY KEY (token, pack));
"""


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelVersion:
    """One registered version of a model: what :meth:`Registry.register` recorded.

    Attributes:
        registry: the registry's folder; ``reference`` is ``REGISTRY/NAME@VERSION``.
        name, version, number: ``version`` is the given semantic version or ``str(number)``;
            ``number`` counts the name's versions (1, 2, 3...), without gaps or repeats.
        fingerprint: ``sha256:`` over every tensor's name, dtype, shape and bytes (xxh3-128),
            in name order: independent of the file layout and of the order of the tensors.
        created: seconds since the epoch; parent: ``NAME@VERSION`` it was fine-tuned from.
        config, metrics, history, metadata: as given (``history``: a run's metrics records).
        system: torch and torchkeep versions, git commit, host, user, python.
        source: what was registered (a path, a run reference, ``"module"``, ``"state dict"``).
        model: ``{"class", "config"}`` when the model can be rebuilt (``get`` returns a module).
        aliases: the aliases pointing at it now; tensors, nbytes: its tensor table.
        duplicate: returned by ``register`` for identical weights already registered.
    """

    registry: str
    name: str
    version: str
    number: int
    fingerprint: str
    created: float
    parent: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    system: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    model: dict[str, Any] | None = None
    aliases: tuple[str, ...] = ()
    tensors: int = 0
    nbytes: int = 0
    duplicate: bool = False

    @property
    def reference(self) -> str:
        return f"{self.registry}/{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["aliases"] = list(self.aliases)
        out["reference"] = self.reference
        return out


def is_registry(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a registry folder (it holds ``torchkeep_registry.json``)."""
    try:
        return (local_path(path) / REGISTRY_FILE).is_file()
    except TorchkeepError:
        return False


def parse_registry_reference(text: str | os.PathLike[str]) -> tuple[Path, str, str] | None:
    """``"models/clf@production"`` -> ``(Path("models"), "clf", "production")``; ``None`` when
    ``text`` names no registry (``REGISTRY/NAME`` alone means its latest version)."""
    text = os.fspath(text)
    if "://" in text:
        return None
    head, at, which = text.rpartition("@")
    if not at:
        head, which = text, "latest"
    p = Path(head)
    if not which or not NAME_PATTERN.match(p.name) or not is_registry(p.parent):
        return None
    return p.parent, p.name, which


def fingerprint(entries: Iterable[tuple[str, str, tuple[int, ...], str]]) -> str:
    """The fingerprint of ``(name, dtype, shape, xxh3-128)`` entries, in any order."""
    h = hashlib.sha256()
    for name, dtype, shape, digest in sorted(entries):
        h.update(json.dumps([name, dtype, list(shape), digest]).encode() + b"\n")
    return f"sha256:{h.hexdigest()}"


class _Packs(RunReader):
    """The run reader's tensor loading, over the registry's ``packs/`` (no run file)."""

    def __init__(self, root: Path) -> None:  # noqa: D107  (RunReader's checks are a run's)
        self.root = root
        self._ranking = None
        self.description = {}

    def is_current(self, manifest: Manifest) -> bool:
        return True  # a version's packs are never deleted while it is in the index


class RegistryIndex:
    """Read access to a registry's index; the writer (``torchkeep.registry``) extends it."""

    def __init__(self, root: str | os.PathLike[str], conn: sqlite3.Connection | None = None):
        self.root = local_path(root)
        if conn is None:
            if not is_registry(self.root):
                raise CheckpointNotFoundError(
                    "not a torchkeep registry (no torchkeep_registry.json)",
                    path=str(self.root),
                    hint="create it with torchkeep.Registry(path)",
                )
            try:
                conn = connect_sqlite(self.root / INDEX_FILE)
            except FileNotFoundError as exc:
                raise CorruptCheckpointError(
                    f"the registry has no {INDEX_FILE}",
                    path=str(self.root),
                    hint="the index was deleted; restore it from a copy",
                ) from exc
        # One connection per thread: threads then share the index as processes do (each
        # transaction its own, serialised by SQLite), never one transaction between two threads.
        self._local = threading.local()
        self._local.conn = conn
        self._opened = [conn]
        self._opened_lock = threading.Lock()

    @property
    def conn(self) -> sqlite3.Connection:
        """This thread's connection to the index (opened on first use)."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect_sqlite(self.root / INDEX_FILE)
            self._local.conn = conn
            with self._opened_lock:
                self._opened.append(conn)
        return conn

    def close(self) -> None:
        with self._opened_lock:
            for conn in self._opened:
                conn.close()
            self._opened.clear()

    def names(self) -> list[str]:
        rows = self.conn.execute("SELECT DISTINCT name FROM versions ORDER BY name")
        return [r[0] for r in rows]

    def versions(self, name: str) -> list[ModelVersion]:
        rows = self.conn.execute(
            "SELECT * FROM versions WHERE name = ? ORDER BY number", (name,)
        ).fetchall()
        if not rows:
            raise self._unknown_name(name)
        aliases = self.aliases(name)
        return [self._record(row, aliases) for row in rows]

    def aliases(self, name: str) -> dict[str, str]:
        rows = self.conn.execute(
            "SELECT alias, version FROM aliases WHERE name = ? ORDER BY alias", (name,)
        )
        return {a: v for a, v in rows}

    def resolve(self, name: str, which: str = "latest") -> ModelVersion:
        """The version ``which`` of ``name``: a version, an alias, or ``"latest"``.

        Raises:
            CheckpointNotFoundError: unknown name, version or alias (the hint lists them).
        """
        which = str(which)
        q = "SELECT * FROM versions WHERE name = ? AND version = ?"
        row = self.conn.execute(q, (name, which)).fetchone()
        if row is None:
            alias = self.conn.execute(
                "SELECT version FROM aliases WHERE name = ? AND alias = ?", (name, which)
            ).fetchone()
            if alias is not None:
                row = self.conn.execute(q, (name, alias[0])).fetchone()
            elif which == "latest":
                row = self.conn.execute(
                    "SELECT * FROM versions WHERE name = ? ORDER BY number DESC LIMIT 1", (name,)
                ).fetchone()
        if row is None:
            known = self.conn.execute("SELECT 1 FROM versions WHERE name = ?", (name,))
            if known.fetchone() is None:
                raise self._unknown_name(name)
            shown = [v.version for v in self.versions(name)][-10:]
            raise CheckpointNotFoundError(
                f"model {name!r} has no version or alias {which!r}",
                path=f"{self.root}/{name}@{which}",
                key=which,
                expected=shown,
                actual=which,
                hint=f"versions: {', '.join(shown)}; aliases: "
                f"{', '.join(self.aliases(name)) or 'none'}; or use @latest",
            )
        return self._record(row, self.aliases(name))

    def _unknown_name(self, name: str) -> CheckpointNotFoundError:
        names = self.names()
        return CheckpointNotFoundError(
            f"the registry has no model named {name!r}",
            path=str(self.root),
            key=name,
            actual=name,
            hint=f"models in it: {', '.join(names[:20]) or 'none'}",
        )

    def _record(self, row: sqlite3.Row | tuple[Any, ...], aliases: dict[str, str]) -> ModelVersion:
        name, number, version, fp, created, parent, record, _ = row
        doc = json.loads(record)
        count, nbytes = self.conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(nbytes), 0) FROM tensors WHERE name = ? AND version = ?",
            (name, version),
        ).fetchone()
        return ModelVersion(
            tensors=count,
            nbytes=nbytes,
            registry=str(self.root),
            name=name,
            version=version,
            number=number,
            fingerprint=fp,
            created=created,
            parent=parent,
            aliases=tuple(a for a, v in aliases.items() if v == version),
            **doc,
        )

    def manifest(self, v: ModelVersion) -> Manifest:
        """The version as a run manifest (skeleton and tensor table), for the run's reader."""
        row = self.conn.execute(
            "SELECT skeleton FROM versions WHERE name = ? AND version = ?", (v.name, v.version)
        ).fetchone()
        if row is None:
            raise CheckpointNotFoundError(f"{v.reference} was deleted", path=v.reference)
        refs = {
            key: TensorRef(
                pack=pack, key=pk, dtype=dt, shape=tuple(json.loads(sh)), nbytes=n, hash=h
            )
            for key, pack, pk, dt, sh, n, h in self.conn.execute(
                "SELECT key, pack, pack_key, dtype, shape, nbytes, hash FROM tensors "
                "WHERE name = ? AND version = ?",
                (v.name, v.version),
            )
        }
        return Manifest(
            path=Path(v.reference),
            step=v.number,
            time=v.created,
            metrics=v.metrics,
            metadata=v.metadata,
            skeleton=json.loads(row[0]),
            tensors=refs,
        )

    def load(
        self,
        v: ModelVersion,
        *,
        map_location: MapLocation = None,
        dtype: torch.dtype | None = None,
        verify: bool = True,
    ) -> Any:
        """The registered state (the state dict), tensors mapped from the packs."""
        m = self.manifest(v)
        return _Packs(self.root).load(m, map_location=map_location, dtype=dtype, verify=verify)

    def check(self, v: ModelVersion) -> list[str]:
        """Every problem of a version: missing or altered packs, tensor hashes, fingerprint."""
        m = self.manifest(v)
        packs, problems, entries = _Packs(self.root), [], []
        for key, ref in sorted(m.tensors.items()):
            try:
                t = packs.load(one_tensor(m, key), verify=False)  # mapped, not copied
            except OSError as exc:
                problems.append(
                    f"{v.reference}: tensor {key!r}: cannot read pack {ref.pack}: {exc}"
                )
                continue
            except TorchkeepError as exc:
                problems.append(f"{v.reference}: tensor {key!r}: {exc.message}")
                continue
            digest = tensor_hash(t)
            if digest != ref.hash:
                problems.append(
                    f"{v.reference}: tensor {key!r} does not match its hash "
                    f"(pack {ref.pack} altered or damaged)"
                )
            entries.append((key, ref.dtype, ref.shape, digest))
        if not problems and fingerprint(entries) != v.fingerprint:
            problems.append(f"{v.reference}: the fingerprint does not match the tensors")
        return problems


def one_tensor(m: Manifest, key: str) -> Manifest:
    """``m`` with a skeleton of the one tensor ``key`` (to read tensors one at a time)."""
    return Manifest(
        path=m.path,
        step=m.step,
        time=m.time,
        metrics={},
        metadata={},
        skeleton={"$": "tensor", "k": key},
        tensors={key: m.tensors[key]},
    )
