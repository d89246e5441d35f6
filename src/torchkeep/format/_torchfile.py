"""Files in torch's own format (``torch.save``), written and read through the checked path only.

Reading never calls ``torch.load(weights_only=False)`` unless the caller passed ``trust=True``, and
never falls back to it when the safe unpickler refuses a file: that fallback is exactly what an
attacker triggers. Before torch's ``weights_only`` unpickler (the real gate) sees the file, a static
scan of its pickles lists the globals it would import, so a refusal can name them.

Writing validates the object with the same rules as safetensors (no arbitrary objects), so what we
write always loads with ``torch.load(weights_only=True)``. User metadata goes in an extra
``torchkeep.json`` record of the zip archive, which ``torch.load`` ignores.
"""

from __future__ import annotations

import json
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from typing import Any, BinaryIO

import torch

from torchkeep._version import __version__
from torchkeep.errors import (
    CorruptCheckpointError,
    TorchkeepError,
    UnsafeCheckpointError,
    UnsupportedValueError,
)
from torchkeep.format._artifact import FORMAT_VERSION, check_format_version, metadata_json
from torchkeep.format._location import MapLocation
from torchkeep.format._pickle_scan import is_allowed_global, scan_file, scan_pickle_bytes
from torchkeep.format._safetensors import parse_json
from torchkeep.format._skeleton import flatten

METADATA_RECORD = "torchkeep.json"
_TRUST_HINT = (
    "if you trust where this file comes from, pass trust=True (it runs code from the file); "
    "better, convert it once to safetensors in a sandbox"
)


def write_torch(obj: Any, f: BinaryIO, metadata: dict[str, Any] | None) -> None:
    """Write ``obj`` with ``torch.save`` to the open (read-write) file ``f``, plus our metadata."""
    flatten(obj)  # refuses anything that would need pickled code to load
    document = {
        "format_version": FORMAT_VERSION,
        "torchkeep_version": __version__,
        "torch_version": str(torch.__version__),
        "metadata": metadata_json(metadata),
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
        unsafe = [g for g in found if not is_allowed_global(g)]
        if unsafe:
            raise UnsupportedValueError(
                f"the object needs {', '.join(unsafe)}, which torch.load(weights_only=True) refuses",
                hint="save to a .safetensors path, or convert those values to plain types",
            )
        prefix = data_pkl[: -len("data.pkl")]
        archive.writestr(prefix + METADATA_RECORD, json.dumps(document))


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
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("/" + METADATA_RECORD)), None)
            if name is None or archive.getinfo(name).file_size > 16 * 1024 * 1024:
                return None
            doc = parse_json(archive.read(name), what="torchkeep record", path=path)
    except (zipfile.BadZipFile, OSError):
        return None
    if not isinstance(doc, dict):
        raise CorruptCheckpointError("the torchkeep record is not a JSON object", path=path)
    check_format_version(doc.get("format_version"), path=path)
    return doc


def load_torch(path: str, *, map_location: MapLocation, trust: bool, zip_format: bool) -> Any:
    """Load a ``torch.save`` file safely (``weights_only``) unless ``trust`` is given.

    Raises:
        UnsafeCheckpointError: the file needs globals the safe unpickler refuses.
        CorruptCheckpointError: the file is damaged.
    """
    if not trust:
        scan = scan_file(path)
        if not scan.is_safe:
            raise UnsafeCheckpointError(
                f"refusing to load: the file imports {', '.join(scan.unsafe)}, which could run code",
                path=path,
                globals=list(scan.unsafe),
                hint=_TRUST_HINT,
            )
    if isinstance(map_location, Mapping):
        map_location = dict(map_location)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            if path.endswith(".safetensors"):
                # torch.load picks its safetensors reader by this suffix; the bytes say otherwise.
                with open(path, "rb") as f:
                    return torch.load(f, map_location=map_location, weights_only=not trust)
            return torch.load(  # type: ignore[no-any-return]
                path, map_location=map_location, weights_only=not trust, mmap=zip_format
            )
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
            raise TorchkeepError(
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
