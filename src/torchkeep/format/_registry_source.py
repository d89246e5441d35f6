"""``REGISTRY/NAME@VERSION_OR_ALIAS`` as a :class:`Source`: what ``open_source`` hands the verbs.

``load`` gives the registered state dict, ``info`` its description (with the version's record
as metadata), ``check`` the version's tensor hashes and fingerprint (``verify``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from torchkeep.errors import CheckpointNotFoundError, CorruptCheckpointError, TorchkeepError
from torchkeep.format._describe import describe
from torchkeep.format._detect import Format
from torchkeep.format._info import CheckpointInfo, FileCheck
from torchkeep.format._location import MapLocation
from torchkeep.format._pickle_files import PickleScan
from torchkeep.format._readers import Source
from torchkeep.format._registry import (
    PACK_DIR,
    ModelVersion,
    RegistryIndex,
    parse_registry_reference,
)
from torchkeep.format._values import plain_values
from torchkeep.format._versions import FORMAT_VERSION
from torchkeep.storage import storage_for


class RegistrySource(Source):
    """A registered version (``REGISTRY/NAME@VERSION_OR_ALIAS``): its state dict."""

    format = Format.REGISTRY

    def _open(self) -> tuple[RegistryIndex, ModelVersion]:
        parsed = parse_registry_reference(self.name)
        if parsed is None:
            raise CheckpointNotFoundError("not a registry reference", path=self.name)
        index = RegistryIndex(parsed[0])
        return index, index.resolve(parsed[1], parsed[2])

    def version(self) -> ModelVersion:
        index, v = self._open()
        index.close()
        return v

    def load(
        self,
        *,
        map_location: MapLocation = None,
        dtype: torch.dtype | None = None,
        trust: bool = False,
        verify: bool = True,
    ) -> Any:
        index, v = self._open()
        try:
            return index.load(v, map_location=map_location, dtype=dtype, verify=verify)
        finally:
            index.close()

    def info(self) -> CheckpointInfo:
        index, v = self._open()
        try:
            obj = index.load(v, verify=False)
            packs = {r.pack for r in index.manifest(v).tensors.values()}
            store = storage_for(index.root)
            size = sum(store.size(str(index.root / PACK_DIR / p)) for p in packs)
        except OSError as exc:
            raise CorruptCheckpointError(
                f"a pack of {v.reference} is missing: {exc.filename}",
                path=v.reference,
                hint="torchkeep registry verify REGISTRY lists the damage",
            ) from exc
        finally:
            index.close()
        meta = v.to_dict()
        for k in ("registry", "tensors", "nbytes", "duplicate"):
            meta.pop(k)
        return CheckpointInfo(
            path=v.reference,
            format=Format.REGISTRY.value,
            tensors=tuple(describe(obj)),
            values=plain_values(obj),
            file_bytes=size,
            metadata=meta,
            format_version=str(FORMAT_VERSION),
        )

    def check(self, shown: str) -> FileCheck:
        try:
            index, v = self._open()
        except TorchkeepError as exc:
            return FileCheck(
                path=shown, format=self.format.value, status="damaged", problems=(exc.message,)
            )
        try:
            problems = index.check(v)
        finally:
            index.close()
        bad = sum("does not match" in p or "tensor" in p for p in problems)
        return FileCheck(
            path=shown,
            format=self.format.value,
            status="damaged" if problems else "ok",
            check="xxh3_128",
            tensors=v.tensors,
            hashed=v.tensors - bad,
            damaged=bad,
            problems=tuple(problems),
        )

    def scan(self) -> PickleScan:
        return PickleScan(path=self.name, records=(), globals=(), unsafe=())  # packs: no pickle


def registry_checks(root: str) -> list[FileCheck]:
    """The check of every version of every model of the registry at ``root``."""
    index = RegistryIndex(root)
    try:
        refs = [v.reference for name in index.names() for v in index.versions(name)]
    finally:
        index.close()
    return [RegistrySource(Path(ref), ref).check(ref) for ref in refs]
