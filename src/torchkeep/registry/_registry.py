"""``tk.Registry``: versions of models, with aliases and lineage, shared without a server.

Several processes (on one machine, or on a shared filesystem with working POSIX locks) may
register, alias and delete at once: every change is one SQLite transaction started with
``BEGIN IMMEDIATE``, so version numbers are taken under the index's write lock (no gap, no
repeat) and an alias move reads the alias and records its history in the same transaction.
How packs and the index stay consistent through a crash is ``_store.py``'s docstring.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import socket
import sqlite3
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from torchkeep.errors import (
    InvalidArgumentError,
    RegistryError,
    TorchkeepError,
)
from torchkeep.format import (
    INDEX_FILE,
    REGISTRY_FILE,
    REGISTRY_KIND,
    SCHEMA,
    ModelVersion,
    clean_metrics,
    fingerprint,
    flatten,
    is_registry,
    is_run,
    metadata_json,
    system_info,
    tensor_hash,
)
from torchkeep.format._dtypes import dtype_name
from torchkeep.format._registry import NAME_PATTERN
from torchkeep.format._versions import FORMAT_VERSION
from torchkeep.io import load_model
from torchkeep.registry import _store
from torchkeep.registry._inputs import resolve
from torchkeep.registry._reading import Reading
from torchkeep.registry._records import (
    AliasMove,
)
from torchkeep.state import AllowImport
from torchkeep.storage import connect_sqlite, local_path, storage_for, transaction

_log = logging.getLogger("torchkeep.registry")


def _check_name(what: str, value: str) -> str:
    if not isinstance(value, str) or not NAME_PATTERN.match(value):
        raise InvalidArgumentError(
            f"invalid {what} {value!r}",
            key=what,
            actual=repr(value),
            hint=f"a {what} is letters, digits, '.', '_' or '-' (at most 128), e.g. 'classifier'",
        )
    return value


class Registry(Reading):
    """A model registry in a folder: versions, aliases, lineage; no server.

    Example:
        >>> reg = torchkeep.Registry("models")
        >>> v = reg.register("classifier", "runs/exp1@best", metadata={"data": "v3"})
        >>> reg.set_alias("classifier", "production", v.version)
        >>> model = reg.get("classifier", "production")  # or load_model("models/classifier@production")
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        root = local_path(path)
        if is_run(root) or root.is_file():
            raise InvalidArgumentError(
                "not a folder for a registry: it is a run or a file",
                path=str(root),
                hint="give the registry its own folder, e.g. Registry('models')",
            )
        store = storage_for(root)
        store.makedirs(str(root / _store.PACK_DIR))
        conn = connect_sqlite(root / INDEX_FILE, create=True)
        with transaction(conn):
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
        if not is_registry(root):
            doc = {"kind": REGISTRY_KIND, "format_version": FORMAT_VERSION}
            text = json.dumps(doc, indent=2).encode()
            store.create_exclusive(str(root / REGISTRY_FILE), lambda f: _write(f, text))
        super().__init__(root, conn)
        _store.collect(conn, root)  # what crashed writers left, as a run's writer does on open

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    # -- writing ------------------------------------------------------------------------------

    def register(
        self,
        name: str,
        source: Any,
        *,
        version: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        parent: str | ModelVersion | None = None,
        allow_duplicate: bool = False,
    ) -> ModelVersion:
        """Register a new version of ``name`` from a module, a state dict, a file or a run
        reference (``"runs/x@best"``).

        Args:
            version: a semantic version (``"1.2.0"``); by default the next number (1, 2, 3...).
            metadata, config, metrics: JSON objects recorded with the version (a run's
                checkpoint metrics and its metrics history are recorded too).
            parent: the version it was fine-tuned from: ``"3"``, ``"other@2"``, an alias, or a
                :class:`ModelVersion`.
            allow_duplicate: register weights identical to an existing version of ``name``
                anyway; by default that version is returned (with ``duplicate=True``).

        Raises:
            RegistryError: ``version`` already exists.
            InvalidArgumentError: a bad name or version; CheckpointNotFoundError: unknown parent.
        """
        _check_name("model name", name)
        if version is not None:
            version = _check_name("version", str(version))
            if version.isdigit() or version == "latest":
                raise InvalidArgumentError(
                    f"version {version!r} would clash with the automatic numbers",
                    key="version",
                    hint="omit version= to number versions 1, 2, 3..., or give a semantic "
                    "version such as '1.0.0'",
                )
        found = resolve(source, config)
        record_config = {**found.config, **dict(config or {})}
        doc = {
            "config": metadata_json(record_config),
            "metrics": clean_metrics({**found.metrics, **dict(metrics or {})}),
            "history": metadata_json({"h": found.history})["h"],
            "metadata": metadata_json(dict(metadata or {})),
            "system": {**system_info(), "user": _store.user()},
            "source": found.source,
            "model": found.model,
        }
        flat = flatten(found.state)
        hashes = {k: tensor_hash(t) for k, t in flat.tensors.items()}
        entries = {k: (dtype_name(t.dtype), tuple(t.shape)) for k, t in flat.tensors.items()}
        fp = fingerprint((k, d, s, hashes[k]) for k, (d, s) in entries.items())
        token, pack = secrets.token_hex(8), _store.new_pack_name()
        with transaction(self.conn):
            duplicate = None if allow_duplicate else self._duplicate(name, fp)
            if duplicate is not None:
                return duplicate
            parent_ref = self._parent(name, parent)
            rows, new = [], {}
            for key, (dtype, shape) in entries.items():
                hit = self.conn.execute(
                    "SELECT pack, pack_key FROM tensors WHERE hash = ? AND dtype = ? AND shape = ?"
                    " LIMIT 1",
                    (hashes[key], dtype, json.dumps(list(shape))),
                ).fetchone()
                where = (hit[0], hit[1]) if hit else (pack, key)
                if hit is None:
                    new[key] = flat.tensors[key].detach()
                rows.append((key, *where, dtype, json.dumps(list(shape)), hashes[key]))
            _store.mark_pending(self.conn, token, {r[1] for r in rows})
        try:
            if new:
                _store.write_new_pack(self.root, new, pack)  # durable before the row commits
            with transaction(self.conn):
                duplicate = None if allow_duplicate else self._duplicate(name, fp)
                if duplicate is None:
                    committed = self._insert(name, version, fp, parent_ref, doc, flat, rows)
                _store.drop_pending(self.conn, token)
        except BaseException:
            self._abandon(token, pack if new else None)
            raise
        if duplicate is not None:
            self._abandon(token, pack if new else None)
            return duplicate
        return committed

    def _duplicate(self, name: str, fp: str) -> ModelVersion | None:
        row = self.conn.execute(
            "SELECT version FROM versions WHERE name = ? AND fingerprint = ? ORDER BY number "
            "LIMIT 1",
            (name, fp),
        ).fetchone()
        if row is None:
            return None
        v = self.resolve(name, row[0])
        _log.info("%s: identical weights are already %s; not registered again", name, v.reference)
        return dataclasses.replace(v, duplicate=True)

    def _parent(self, name: str, parent: str | ModelVersion | None) -> str | None:
        if parent is None:
            return None
        if isinstance(parent, ModelVersion):
            other, which = parent.name, parent.version
        else:
            head, at, which = str(parent).rpartition("@")
            other = Path(head).name if at else name
            which = which if at else str(parent)
        return f"{other}@{self.resolve(other, which).version}"

    def _insert(
        self,
        name: str,
        version: str | None,
        fp: str,
        parent: str | None,
        doc: dict[str, Any],
        flat: Any,
        rows: list[tuple[Any, ...]],
    ) -> ModelVersion:
        # The name's counter, not MAX(number): a deleted version's number is never given again.
        (top,) = self.conn.execute(
            "SELECT MAX(COALESCE((SELECT last FROM counters WHERE name = ?), 0), "
            "COALESCE((SELECT MAX(number) FROM versions WHERE name = ?), 0))",
            (name, name),
        ).fetchone()
        number = top + 1
        self.conn.execute(
            "INSERT INTO counters VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET last = ?",
            (name, number, number),
        )
        version = version or str(number)
        exists = self.conn.execute(
            "SELECT 1 FROM versions WHERE name = ? AND version = ?", (name, version)
        ).fetchone()
        if exists:
            raise RegistryError(
                f"model {name!r} already has version {version!r}",
                path=str(self.root),
                key=version,
                hint="give another version=, or omit it to number the version automatically",
            )
        nbytes = {k: t.numel() * t.element_size() for k, t in flat.tensors.items()}
        self.conn.execute(
            "INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                name,
                number,
                version,
                fp,
                time.time(),
                parent,
                json.dumps(doc),
                json.dumps(flat.skeleton),
            ),
        )
        self.conn.executemany(
            "INSERT INTO tensors VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(name, version, k, p, pk, d, s, nbytes[k], h) for k, p, pk, d, s, h in rows],
        )
        return self.resolve(name, version)

    def _abandon(self, token: str, pack: str | None) -> None:
        """Undo a register that did not commit: its pending rows, and the pack it wrote."""
        try:
            with transaction(self.conn):
                _store.drop_pending(self.conn, token)
            if pack is not None:
                _store.delete_pack(self.root, pack)
        except (TorchkeepError, OSError, sqlite3.Error):
            pass  # left for the next collection

    def set_alias(self, name: str, alias: str, version: str | None) -> AliasMove:
        """Point ``alias`` of ``name`` at ``version`` (a version or another alias), atomically,
        and record the move; ``version=None`` removes the alias."""
        _check_name("alias", alias)
        if alias.isdigit() or alias == "latest":
            raise InvalidArgumentError(
                f"alias {alias!r} would read as a version",
                key="alias",
                hint="use a word, such as 'production' or 'staging'",
            )
        with transaction(self.conn):
            target = None if version is None else self.resolve(name, str(version)).version
            if target is None and not self.versions(name):
                raise self._unknown_name(name)
            row = self.conn.execute(
                "SELECT version FROM aliases WHERE name = ? AND alias = ?", (name, alias)
            ).fetchone()
            now = time.time()
            if target is None:
                self.conn.execute("DELETE FROM aliases WHERE name = ? AND alias = ?", (name, alias))
            else:
                self.conn.execute(
                    "INSERT INTO aliases VALUES (?, ?, ?, ?) ON CONFLICT (name, alias) "
                    "DO UPDATE SET version = excluded.version, moved = excluded.moved",
                    (name, alias, target, now),
                )
            move = AliasMove(
                name=name,
                alias=alias,
                from_version=row[0] if row else None,
                to_version=target,
                user=_store.user(),
                host=socket.gethostname(),
                pid=os.getpid(),
                time=now,
            )
            self.conn.execute(
                "INSERT INTO alias_history (name, alias, from_version, to_version, user, host, "
                "pid, time) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    name,
                    alias,
                    move.from_version,
                    move.to_version,
                    move.user,
                    move.host,
                    move.pid,
                    move.time,
                ),
            )
        return move

    def delete(self, name: str, version: str) -> None:
        """Delete a version; refused while an alias points at it. Other versions keep every
        tensor they use; packs no version uses any more are then deleted (crash-safe).

        Raises:
            RegistryError: an alias points at the version.
        """
        with transaction(self.conn):
            v = self.resolve(name, str(version))
            if v.aliases:
                raise RegistryError(
                    f"{v.reference} is aliased as {', '.join(v.aliases)}; not deleted",
                    path=str(self.root),
                    key=v.version,
                    hint=f"move the alias first: set_alias({name!r}, {v.aliases[0]!r}, "
                    "<another version>) or set_alias(..., None) to remove it",
                )
            self.conn.execute(
                "DELETE FROM tensors WHERE name = ? AND version = ?", (name, v.version)
            )
            self.conn.execute(
                "DELETE FROM versions WHERE name = ? AND version = ?", (name, v.version)
            )
        _store.collect(self.conn, self.root)

    def collect(self) -> list[str]:
        """Delete packs no version uses (left by a crash); returns their names."""
        return _store.collect(self.conn, self.root)

    # -- reading ------------------------------------------------------------------------------

    def get(
        self,
        name: str,
        version_or_alias: str | int = "latest",
        *,
        map_location: str | torch.device | None = None,
        model_class: type[nn.Module] | None = None,
        allow_import: AllowImport = None,
    ) -> Any:
        """The model (rebuilt as ``load_model`` does, when its class and config are known) or
        else the state dict (as ``load`` returns it) of a version or alias."""
        v = self.resolve(name, str(version_or_alias))
        if v.model is not None:
            return load_model(
                v.reference,
                map_location=map_location,
                model_class=model_class,
                allow_import=allow_import,
            )
        return self.load(v, map_location=map_location)


def _write(f: BinaryIO, data: bytes) -> None:
    f.write(data)
