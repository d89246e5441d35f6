"""Plain DCP directories (written by ``torch.distributed.checkpoint.save``): read, never trusted.

A DCP directory holds ``.metadata``, a pickle of DCP's ``Metadata`` (per tensor: dtype, full
size, chunks; per chunk: which ``.distcp`` file, offset and length), and ``__<rank>_<n>.distcp``
files in which every chunk is a ``torch.save`` blob (every non-tensor value too). Both are
pickles, so both go through gates before anything is unpickled:

* ``.metadata``: the static scan (``_pickle_scan``) lists the globals it would import; any
  global outside DCP's metadata classes (and the torch values they hold: dtypes, ``torch.Size``,
  layouts) refuses the file, naming the global; then a restricted unpickler that resolves only
  those same globals reads it (a scan that the real unpickler disagrees with still fails closed);
* each blob: the scan of its ``data.pkl``, then torch's ``weights_only=True`` unpickler.

A full tensor is assembled chunk by chunk into one buffer, so a load holds about one copy of the
weights. The nested structure comes from DCP's ``planner_data`` (each key's path).
"""

from __future__ import annotations

import io
import math
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from torchkeep.errors import CorruptCheckpointError, TorchkeepError, UnsafeCheckpointError
from torchkeep.format._checks import damaged
from torchkeep.format._describe import describe
from torchkeep.format._detect import Format
from torchkeep.format._info import CheckpointInfo, FileCheck
from torchkeep.format._location import MapLocation, cast, map_tensors, relocate
from torchkeep.format._pickle_allow import is_allowed_global
from torchkeep.format._pickle_files import PickleScan, scan_file
from torchkeep.format._pickle_scan import scan_pickle_bytes
from torchkeep.format._readers import Source
from torchkeep.storage import storage_for

METADATA_FILE = ".metadata"
_METADATA_LIMIT = 256 * 1024 * 1024
_DCP = "torch.distributed.checkpoint"
ALLOWED_METADATA_GLOBALS = frozenset(
    {
        f"{_DCP}.metadata.{name}"
        for name in (
            "Metadata",
            "TensorStorageMetadata",
            "TensorProperties",
            "ChunkStorageMetadata",
            "BytesStorageMetadata",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        )
    }
    | {
        f"{_DCP}.filesystem._StorageInfo",
        "torch.Size",
        "torch.serialization._get_layout",
        "pathlib.PosixPath",
        "pathlib.PurePosixPath",
        "collections.OrderedDict",
    }
)


def is_dcp_dir(path: str | Path) -> bool:
    """A directory with DCP's ``.metadata`` and at least one ``.distcp`` file."""
    p = Path(path)
    return (
        p.is_dir()
        and (p / METADATA_FILE).is_file()
        and any(q.suffix == ".distcp" for q in p.iterdir())
    )


def _allowed(name: str) -> bool:
    if name in ALLOWED_METADATA_GLOBALS:
        return True
    module, _, attr = name.rpartition(".")
    return module == "torch" and isinstance(getattr(torch, attr, None), torch.dtype)


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only DCP's metadata classes and the torch values they hold."""

    def __init__(self, data: bytes, path: str) -> None:
        super().__init__(io.BytesIO(data))
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if not _allowed(f"{module}.{name}"):
            raise _refused(self.path, f"{module}.{name}")
        return super().find_class(module, name)


def _refused(path: str, name: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"the DCP metadata would import {name}, which is not one of DCP's metadata classes",
        path=path,
        key=name,
        hint="this .metadata was not written by torch.distributed.checkpoint.save, or was "
        "altered: do not load it; get the checkpoint from its source again",
    )


def read_metadata(directory: Path) -> Any:
    """DCP's ``Metadata`` of ``directory``, through the static scan and the restricted unpickler.

    Raises:
        UnsafeCheckpointError: the pickle names a global outside DCP's metadata classes.
        CorruptCheckpointError: it is no pickle, or not DCP metadata.
    """
    path = directory / METADATA_FILE
    store = storage_for(path)
    if store.size(str(path)) > _METADATA_LIMIT:
        raise CorruptCheckpointError("DCP metadata over 256 MiB", path=str(path))
    with store.open_read(str(path)) as f:
        data = f.read()
    found, _ = scan_pickle_bytes(data, name=str(path))
    for name in found:
        if not _allowed(name):
            raise _refused(str(path), name)
    try:
        metadata = _MetadataUnpickler(data, str(path)).load()
    except UnsafeCheckpointError:
        raise
    except Exception as exc:
        raise CorruptCheckpointError(
            f"the DCP metadata cannot be read: {exc}", path=str(path)
        ) from exc
    if type(metadata).__name__ != "Metadata" or not hasattr(metadata, "state_dict_metadata"):
        raise CorruptCheckpointError("the .metadata pickle is not DCP metadata", path=str(path))
    return metadata


def _blob(directory: Path, info: Any, what: str) -> Any:
    """One ``torch.save`` blob of a ``.distcp`` file: scanned, then ``weights_only`` loaded."""
    name = str(info.relative_path)
    if Path(name).name != name or not name.endswith(".distcp"):
        raise CorruptCheckpointError(f"{what} names file {name!r} outside the directory")
    if getattr(info, "transform_descriptors", None):
        raise CorruptCheckpointError(
            f"{what} is stored with transforms {info.transform_descriptors}, which torchkeep "
            "does not read",
            path=str(directory / name),
        )
    path = directory / name
    offset, length = info.offset, info.length
    if not (type(offset) is int and type(length) is int and offset >= 0 and length >= 0):
        raise CorruptCheckpointError(
            f"{what}: offset {offset!r} and length {length!r} are not byte counts", path=str(path)
        )
    with storage_for(path).open_read(str(path)) as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise CorruptCheckpointError(f"{what}: {name} is truncated", path=str(path))
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            pkl = next(n for n in archive.namelist() if n.endswith("data.pkl"))
            found, _ = scan_pickle_bytes(archive.read(pkl), name=f"{path}:{what}")
    except (zipfile.BadZipFile, StopIteration) as exc:
        raise CorruptCheckpointError(f"{what} is not a torch.save blob", path=str(path)) from exc
    refused = [g for g in found if not is_allowed_global(g)]
    if refused:
        raise UnsafeCheckpointError(
            f"{what} would import {refused[0]}", path=str(path), key=refused[0]
        )
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def load_dcp(directory: Path) -> dict[str, Any]:
    """The whole state of a DCP directory as one nested dict of full tensors (and values)."""
    metadata = read_metadata(directory)
    storage = metadata.storage_data or {}
    by_fqn: dict[str, list[tuple[Any, Any]]] = {}
    for index, info in storage.items():
        by_fqn.setdefault(index.fqn, []).append((index, info))
    store = storage_for(directory)
    names = [n for n in store.list(str(directory)) if n.endswith(".distcp")]
    budget = sum(store.size(str(directory / n)) for n in names)
    flat: dict[str, Any] = {}
    for fqn, meta in metadata.state_dict_metadata.items():
        try:
            flat[fqn] = _entry(directory, fqn, meta, by_fqn.get(fqn, []), budget)
        except TorchkeepError:
            raise
        except (ValueError, TypeError, AttributeError, IndexError, RuntimeError) as exc:
            raise CorruptCheckpointError(
                f"DCP entry {fqn!r} is malformed ({exc})",
                path=str(directory),
                key=str(fqn),
                hint="the .metadata does not match its .distcp files: altered or damaged",
            ) from exc
    return _nest(flat, metadata.planner_data)


def _entry(
    directory: Path, fqn: str, meta: Any, entries: list[tuple[Any, Any]], budget: int
) -> Any:
    """One value of a DCP directory: a full tensor assembled from its chunks, or a value."""
    if not hasattr(meta, "chunks"):  # BytesStorageMetadata: a torch.save'd value
        if len(entries) != 1:
            raise CorruptCheckpointError(f"value {fqn!r} has no stored bytes", key=fqn)
        return _blob(directory, entries[0][1], f"value {fqn!r}")
    size, dtype = tuple(int(n) for n in meta.size), meta.properties.dtype
    nbytes = math.prod(size) * dtype.itemsize
    if any(n < 0 for n in size) or nbytes > budget:  # refused before it is allocated
        raise CorruptCheckpointError(
            f"tensor {fqn!r} claims {nbytes} bytes, more than its directory's {budget} of data",
            path=str(directory),
            key=fqn,
        )
    full = torch.empty(size, dtype=dtype)
    covered = 0
    for index, info in entries:
        chunk = _blob(directory, info, f"chunk of {fqn!r}")
        if not isinstance(chunk, torch.Tensor):
            raise CorruptCheckpointError(f"a chunk of {fqn!r} is not a tensor", key=fqn)
        region = full
        for dim, (start, n) in enumerate(zip(index.offset, chunk.shape, strict=True)):
            region = region.narrow(dim, int(start), int(n))
        region.copy_(chunk)
        covered += chunk.numel()
    if covered != full.numel():
        raise CorruptCheckpointError(
            f"tensor {fqn!r}: its chunks cover {covered} of {full.numel()} elements",
            path=str(directory),
            key=fqn,
        )
    return full


def _nest(flat: dict[str, Any], planner_data: Any) -> dict[str, Any]:
    """Flat DCP keys back into the nested dict they were saved from (``planner_data`` paths)."""
    if not isinstance(planner_data, dict):
        return flat
    out: dict[str, Any] = {}
    for fqn, value in flat.items():
        path = planner_data.get(fqn, (fqn,))
        node = out
        for part in path[:-1]:
            node = node.setdefault(str(part), {})
        node[str(path[-1])] = value
    return out


class DcpSource(Source):
    """A plain DCP directory: loaded whole (full tensors), inspected, verified, scanned."""

    format = Format.DCP

    def load(
        self,
        *,
        map_location: MapLocation = None,
        dtype: torch.dtype | None = None,
        trust: bool = False,
        verify: bool = True,
    ) -> Any:
        state = load_dcp(self.path)
        if map_location is None and dtype is None:
            return state
        where = str(self.path)

        def move(t: torch.Tensor) -> torch.Tensor:
            return cast(relocate(t, "cpu", map_location, key="", path=where), dtype)

        return map_tensors(state, move)

    def info(self) -> CheckpointInfo:
        store = storage_for(self.path)
        size = sum(
            store.size(str(self.path / n))
            for n in store.list(str(self.path))
            if n == METADATA_FILE or n.endswith(".distcp")
        )
        return self._info(self.load(), {}, None, size)

    def check(self, shown: str) -> FileCheck:
        try:
            state = load_dcp(self.path)  # every chunk read, scanned and unpickled
        except UnsafeCheckpointError as exc:
            return FileCheck(
                path=shown, format=self.format.value, status="unsafe", problems=(exc.message,)
            )
        except TorchkeepError as exc:
            return damaged(shown, self.format.value, exc.message)
        n = sum(1 for _ in describe(state))
        return FileCheck(path=shown, format=self.format.value, status="ok", tensors=n, structural=n)

    def scan(self) -> PickleScan:
        return scan_file(self.path / METADATA_FILE)
