"""Files in torch's own format (``torch.save``), written and read through the checked path only.

Reading never calls ``torch.load(weights_only=False)`` unless the caller passed ``trust=True``, and
never falls back to it when the safe unpickler refuses a file: that fallback is exactly what an
attacker triggers. Before torch's ``weights_only`` unpickler (the real gate) sees the file, a static
scan of its pickles lists the globals it would import, so a refusal can name them. A file whose
only refused globals are the harmless values of :mod:`._safe_values` (numpy arrays, scalars and
dtypes, ``pathlib`` paths, ``torch.__version__``) loads through the same unpickler, with those
names mapped to torchkeep's own checked rebuild functions.

Writing validates the object with the same rules as safetensors (no arbitrary objects), so what we
write always loads with ``torch.load(weights_only=True)``, except that numpy values, paths and the
torch version are pickled as ``torch.save`` pickles them, so plain torch reads those only inside
``torch.serialization.safe_globals`` (torchkeep reads them through its allow-list). User metadata
goes in an extra ``torchkeep.json`` record of the zip archive, which ``torch.load`` ignores. That
record also holds the xxh3-128 hash of every tensor (keyed as :func:`flatten` keys them) and of
every zip member that is not tensor storage (``data.pkl``, ``version``...), and ends with a digest
of itself (:func:`seal_json`), so that a changed byte anywhere in the structure or in a tensor is
found.

What a verified read checks, by kind of file:

* a torch zip written by torchkeep: the record's seal, every non-storage member against its hash,
  every tensor against its hash after loading;
* a torch zip from elsewhere: the CRC-32 that the zip records for every member (``torch.load``
  itself never checks them);
* a legacy (pre-1.6, non-zip) file: nothing beyond what unpickling it needs, since the format
  records no checksum.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import warnings
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any, BinaryIO

import torch
import xxhash

from torchkeep.errors import (
    CorruptCheckpointError,
    InvalidArgumentError,
    TorchkeepError,
    UnsafeCheckpointError,
    UnsupportedValueError,
)
from torchkeep.format._artifact import check_format_version, metadata_json
from torchkeep.format._hash import hash_matches, seal_json, seal_ok, tensor_hash
from torchkeep.format._json import parse_json
from torchkeep.format._location import MapLocation
from torchkeep.format._pickle_allow import is_allowed_global
from torchkeep.format._pickle_files import open_zip, read_member, scan_file
from torchkeep.format._pickle_scan import scan_pickle_bytes
from torchkeep.format._safe_values import SAFE_VALUE_GLOBALS, rebuilding_safe_values, resolve
from torchkeep.format._skeleton import flatten
from torchkeep.format._versions import version_block
from torchkeep.storage import is_url, storage_for

METADATA_RECORD = "torchkeep.json"
# what zipfile raises on damaged archives: flipped flag bits read as encryption (RuntimeError)
# or an unknown compression method (NotImplementedError), lying sizes and offsets...
_ZIP_ERRORS: tuple[type[Exception], ...] = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    OSError,
    EOFError,
    ValueError,
)
_ZIP_ERRORS += (NotImplementedError, RuntimeError, zlib.error, KeyError, IndexError)
_RECORD_LIMIT = 16 * 1024 * 1024
_DAMAGED_HINT = "restore the file from a copy; verify=False loads it anyway"
_TRUST_HINT = (
    "if you trust where this file comes from, pass trust=True (it runs code from the file); "
    "better, convert it once to safetensors in a sandbox"
)


def write_torch(obj: Any, f: BinaryIO, metadata: dict[str, Any] | None) -> None:
    """Write ``obj`` with ``torch.save`` to the open (read-write) file ``f``, plus our metadata."""
    flat = flatten(obj)  # refuses anything that would need pickled code to load
    document = {
        **version_block(),
        "metadata": metadata_json(metadata),
        "hashes": {key: tensor_hash(t) for key, t in flat.tensors.items()},
    }
    writer = _ErrorKeepingWriter(f)
    try:
        torch.save(obj, writer)  # type: ignore[arg-type]  # a file-like object torch accepts
    except (KeyError, RuntimeError, TypeError, ValueError, pickle.PicklingError) as exc:
        if writer.error is not None:
            # torch's zip writer turns a failed write into "unexpected pos ...": the disk
            # failed (full, read-only, I/O error), not the object. The caller maps the errno.
            raise writer.error from exc
        raise UnsupportedValueError(
            f"torch.save cannot store this object: {exc}",
            hint="save to a .safetensors path, which stores every torch dtype",
        ) from exc
    f.flush()
    f.seek(0)
    with zipfile.ZipFile(f, "a") as archive:
        data_pkl = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        found, _ = scan_pickle_bytes(archive.read(data_pkl), name=data_pkl)
        # torchkeep's allow-list (._safe_values) reads numpy values, paths and torch versions back
        unsafe = [g for g in found if not is_allowed_global(g) and g not in SAFE_VALUE_GLOBALS]
        if unsafe:
            raise UnsupportedValueError(
                f"the object needs {', '.join(unsafe)}, which torch.load(weights_only=True) refuses",
                hint="save to a .safetensors path, or convert those values to plain types",
            )
        prefix = data_pkl[: -len("data.pkl")]
        document["records"] = {
            name: _bytes_hash(read_member(archive, name, "the new file"))
            for name in archive.namelist()
            if not _is_storage(name)
        }
        archive.writestr(
            prefix + METADATA_RECORD,
            seal_json(json.dumps(document, separators=(",", ":")).encode()),
        )


def _is_storage(name: str) -> bool:
    """A zip member holding a tensor storage (``archive/data/0``), not structure."""
    return name.partition("/")[2].startswith("data/")


def _bytes_hash(data: bytes) -> str:
    return "xxh3_128:" + xxhash.xxh3_128_hexdigest(data)


class _ErrorKeepingWriter:
    """A file wrapper for ``torch.save`` that keeps the first ``OSError`` of a write, which
    torch's C++ zip writer would otherwise report as a bare position mismatch."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self._f.flush()


def read_document(path: str) -> dict[str, Any] | None:
    """The torchkeep record of a torch zip file, or ``None`` when it was not written by us."""
    name: str | None = None
    try:
        with open_zip(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("/" + METADATA_RECORD)), None)
            if name is None:
                return None
            size = archive.getinfo(name).file_size
            if size > _RECORD_LIMIT:
                raise CorruptCheckpointError(
                    f"the {METADATA_RECORD} record declares {size} bytes, over the "
                    f"{_RECORD_LIMIT >> 20} MiB it may have: the file was altered or damaged",
                    path=path,
                    hint=_DAMAGED_HINT,
                )
            data = archive.read(name)
    except TorchkeepError:
        raise
    except _ZIP_ERRORS as exc:
        if name is None:
            return None  # not a zip torchkeep can open: the format checks say why
        raise CorruptCheckpointError(
            f"the {METADATA_RECORD} record is damaged ({exc})", path=path, hint=_DAMAGED_HINT
        ) from exc
    doc = parse_json(data, what="torchkeep record", path=path)
    if not isinstance(doc, dict):
        raise CorruptCheckpointError("the torchkeep record is not a JSON object", path=path)
    check_format_version(doc.get("format_version"), path=path)
    if "hashes" in doc or "digest" in doc:  # written by a torchkeep that seals the record
        if not seal_ok(data):
            raise CorruptCheckpointError(
                f"the {METADATA_RECORD} record does not match its digest: the file was altered "
                "or damaged",
                path=path,
                hint=_DAMAGED_HINT,
            )
        if not isinstance(doc.get("hashes"), dict) or not isinstance(doc.get("records"), dict):
            raise CorruptCheckpointError(
                f"the hashes in the {METADATA_RECORD} record are malformed", path=path
            )
    return doc


def is_hashed(doc: dict[str, Any] | None) -> bool:
    """True for the record of a file that carries per-tensor hashes."""
    return doc is not None and isinstance(doc.get("hashes"), dict)


def damaged_members(path: str, *, skip_storages: bool = False) -> list[str]:
    """Zip members whose bytes fail the CRC-32 the archive records for them (or cannot be read).

    Python's zipfile checks the CRC of a member read to its end; torch's reader never does.
    """
    problems: list[str] = []
    try:
        with open_zip(path) as archive:
            for info in archive.infolist():
                if skip_storages and _is_storage(info.filename):
                    continue
                try:
                    with archive.open(info) as member:
                        while member.read(1 << 24):
                            pass
                except _ZIP_ERRORS as exc:
                    problems.append(f"zip member {info.filename}: {exc}")
    except _ZIP_ERRORS as exc:
        problems.append(f"the zip archive is damaged ({exc})")
    return problems


def damaged_records(path: str, doc: dict[str, Any]) -> list[str]:
    """Non-storage members (``data.pkl``...) whose bytes differ from the hash the record holds."""
    problems: list[str] = []
    try:
        with open_zip(path) as archive:
            names = set(archive.namelist())
            for name, expected in doc["records"].items():
                if name not in names:
                    problems.append(f"zip member {name} is missing")
                    continue
                try:
                    data = read_member(archive, name, path)
                except TorchkeepError as exc:  # declares a size over the limit
                    problems.append(f"zip member {name}: {exc.message}")
                    continue
                except _ZIP_ERRORS as exc:
                    problems.append(f"zip member {name}: {exc}")
                    continue
                if not isinstance(expected, str) or _bytes_hash(data) != expected:
                    problems.append(f"zip member {name} does not match its hash")
    except _ZIP_ERRORS as exc:
        problems.append(f"the zip archive is damaged ({exc})")
    return problems


def damaged_tensors(obj: Any, doc: dict[str, Any], *, path: str) -> tuple[int, list[str]]:
    """Check every tensor of a loaded torchkeep ``.pt`` against the hashes in its record.

    Returns:
        How many tensors matched, and one problem per tensor that did not (or is missing).
    """
    hashes: dict[str, Any] = doc["hashes"]
    try:
        tensors = flatten(obj).tensors
    except TorchkeepError as exc:
        return 0, [f"the loaded structure does not flatten: {exc.message}"]
    good, problems = 0, []
    for key, expected in hashes.items():
        t = tensors.get(key)
        if t is None:
            problems.append(f"tensor {key!r} is missing")
        elif t.device.type == "meta":  # map_location="meta": no bytes to check
            continue
        elif isinstance(expected, str) and hash_matches(t, expected):
            good += 1
        else:
            problems.append(f"tensor {key!r} does not match its hash")
    problems += [f"tensor {key!r} has no recorded hash" for key in tensors if key not in hashes]
    return good, problems


def raise_first(path: str, problems: list[str]) -> None:
    """Raise a :class:`CorruptCheckpointError` naming the first of ``problems``, if any."""
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise CorruptCheckpointError(
            f"{problems[0]}: the file was altered or damaged{more}",
            path=path,
            hint=_DAMAGED_HINT,
        )


def load_torch(
    path: str,
    *,
    map_location: MapLocation,
    trust: bool,
    zip_format: bool,
    verify: bool = False,
) -> Any:
    """Load a ``torch.save`` file safely (``weights_only``) unless ``trust`` is given.

    With ``verify``, a zip file is checked first (hashes of a torchkeep file, CRC-32 of another)
    and a torchkeep file's tensors after loading; see the module docstring.

    Raises:
        UnsafeCheckpointError: the file needs globals the safe unpickler refuses.
        CorruptCheckpointError: the file is damaged.
    """
    values = False  # the file needs our allow-list of harmless values (._safe_values)
    if not trust:
        scan = scan_file(path)  # also holds rebuilt values to the _codecs calls pickle writes
        if scan.unsafe:
            raise UnsafeCheckpointError(
                f"refusing to load: the file imports {', '.join(scan.unsafe)}, which could run code",
                path=path,
                globals=list(scan.unsafe),
                hint=_TRUST_HINT,
            )
        values = bool(scan.rebuilt)
    doc = read_document(path) if verify and zip_format else None
    if doc is not None and is_hashed(doc):
        raise_first(path, damaged_records(path, doc))  # the structure, before unpickling it
    elif verify and zip_format:
        raise_first(path, damaged_members(path))
    obj = _torch_load(
        path, map_location=map_location, trust=trust, zip_format=zip_format, values=values
    )
    if doc is not None and is_hashed(doc):
        raise_first(path, damaged_tensors(obj, doc, path=path)[1])
    return obj


def _torch_load(
    path: str, *, map_location: MapLocation, trust: bool, zip_format: bool, values: bool
) -> Any:
    """``torch.load`` with torch's safe unpickler, ``values`` mapping our harmless-value globals."""
    if isinstance(map_location, Mapping):
        map_location = dict(map_location)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            rebuilding = rebuilding_safe_values(path) if values else contextlib.nullcontext()
            with rebuilding:
                if path.endswith(".safetensors") or is_url(path):
                    # (a remote object is read through the store, without mmap)
                    # torch.load picks its safetensors reader by this suffix; the bytes say otherwise.
                    with storage_for(path).open_read(path) as f:
                        obj = torch.load(f, map_location=map_location, weights_only=not trust)
                else:
                    # A path, not storage_for(path).open_read: mmap=True needs a real file
                    # (see storage/_protocol.py for what a remote store does instead).
                    obj = torch.load(
                        path, map_location=map_location, weights_only=not trust, mmap=zip_format
                    )
        return resolve(obj, path) if values else obj
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Unsupported global" in text or "weights_only" in text.lower():
            raise UnsafeCheckpointError(
                "refusing to load: torch's safe unpickler rejected the file: "
                + text.split("Check the documentation")[0].strip(),
                path=path,
                hint=_TRUST_HINT,
            ) from exc
        raise CorruptCheckpointError(f"the pickle is damaged: {exc}", path=path) from exc
    except TorchkeepError:
        raise
    except Exception as exc:  # torch raises many types for damaged files; none must escape raw
        text = str(exc)
        if "deserialize object on" in text or "CUDA" in text:
            raise InvalidArgumentError(
                f"cannot place the tensors: {text.splitlines()[0]}",
                path=path,
                hint="pass map_location='cpu', or a device this machine has",
            ) from exc
        if trust and isinstance(exc, ImportError | AttributeError):
            raise TorchkeepError(
                f"the file needs code that cannot be imported here: {exc}",
                path=path,
                hint="install or import the package that defines the saved classes",
            ) from exc
        raise CorruptCheckpointError(
            f"torch could not read the file ({type(exc).__name__}: {text.splitlines()[0] if text else ''})",
            path=path,
            hint="the file is truncated or damaged; restore it from a copy",
        ) from exc
