"""Single-file checkpoints in safetensors: torchkeep's own, and plain ones from anywhere.

A torchkeep file is a plain safetensors file whose ``__metadata__`` carries two entries:
``"format": "pt"`` (what Hugging Face loaders expect) and ``"torchkeep"``, a JSON document::

    {"format_version": "1.0", "torchkeep_version": ..., "torch_version": ...,
     "skeleton": <the tree, see _skeleton.py>, "raw": {key: {"dtype", "shape"}}, "metadata": {...}}

``raw`` lists the tensors stored as bytes because safetensors has no code for their dtype.
Readers refuse a newer major ``format_version`` with :class:`FormatVersionError`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from typing import Any, BinaryIO

import torch

from torchkeep._version import __version__
from torchkeep.errors import CorruptCheckpointError, FormatVersionError, UnsupportedValueError
from torchkeep.format._deferred import Deferred
from torchkeep.format._deferred import current as current_deferred
from torchkeep.format._direct import track
from torchkeep.format._dtypes import shape_numel, tensor_dtype_from_name
from torchkeep.format._hash import hash_matches, tensor_hash
from torchkeep.format._json import parse_json
from torchkeep.format._location import MapLocation
from torchkeep.format._rebuild import rebuild
from torchkeep.format._safetensors import (
    MappedFile,
    canonical_header,
    header_entries,
    layout_digest,
    raw_dtypes,
    read_header,
    write_safetensors,
)
from torchkeep.format._skeleton import flatten
from torchkeep.format._versions import FORMAT_VERSION, version_block

METADATA_KEY = "torchkeep"
PACK_KIND = "torchkeep-pack"  # in the header of every pack a run writes (see write_pack)
DIGEST_KEY = "torchkeep_digest"
_VERSION = re.compile(r"([0-9]{1,9})(?:\.[0-9]{1,9}){0,3}", re.ASCII)


def check_format_version(version: Any, *, path: str) -> str:
    """Accept format versions this torchkeep reads; refuse newer majors with a clear error."""
    # ASCII digits only, and few: str.isdigit() accepts "²" and 5,000-digit runs, int() does not
    match = _VERSION.fullmatch(version) if isinstance(version, str) else None
    if match is None:
        raise CorruptCheckpointError(
            f"invalid torchkeep format version {str(version)[:40]!r}",
            path=path,
            hint="the file was altered or written by another tool; restore it from a copy",
        )
    if int(match[1]) > int(FORMAT_VERSION.partition(".")[0]):
        raise FormatVersionError(
            f"written with torchkeep format {version}; this torchkeep {__version__} reads "
            f"format {FORMAT_VERSION} and older",
            path=path,
            expected=FORMAT_VERSION,
            actual=version,
            hint="upgrade torchkeep: pip install -U torchkeep",
        )
    return match[0]


def metadata_json(metadata: dict[str, Any] | None) -> dict[str, Any]:
    """Check that user metadata is JSON (string keys, finite numbers) and return a copy of it."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise UnsupportedValueError("metadata must be a dict", hint="pass metadata={'key': value}")

    def check_keys(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if not isinstance(k, str):
                    raise UnsupportedValueError(
                        f"metadata key {k!r} at {where} is not a string; JSON would turn it into {str(k)!r}",
                        hint="use string keys in metadata",
                    )
                check_keys(v, f"{where}[{k!r}]")
        elif isinstance(node, list | tuple):
            for i, v in enumerate(node):
                check_keys(v, f"{where}[{i}]")

    check_keys(metadata, "metadata")
    try:
        return json.loads(json.dumps(metadata, allow_nan=False))  # type: ignore[no-any-return]  # json.loads is Any; a dict went in
    except (TypeError, ValueError) as exc:
        raise UnsupportedValueError(
            f"metadata must be JSON (strings, finite numbers, bools, None, lists, dicts): {exc}",
            hint="convert values with str(), float() or .tolist() first",
        ) from exc


def write_artifact(obj: Any, f: BinaryIO, metadata: dict[str, Any] | None) -> None:
    """Write ``obj`` as a torchkeep safetensors file to the open binary file ``f``."""
    flat = flatten(obj)
    document = {
        **version_block(),
        "skeleton": flat.skeleton,
        "raw": raw_dtypes(flat.tensors),
        "metadata": metadata_json(metadata),
        "hashes": {key: tensor_hash(t) for key, t in flat.tensors.items()},
    }
    _write_sealed(f, flat.tensors, document)


def _write_sealed(
    f: BinaryIO,
    tensors: dict[str, torch.Tensor],
    document: dict[str, Any],
    data: Callable[[str], Iterable[memoryview]] | None = None,
) -> None:
    """Write a torchkeep safetensors file whose header carries a digest of itself."""

    def sealed(entries: dict[str, Any]) -> dict[str, str]:
        # The digest covers the layout and every metadata value, so that a changed byte in
        # the header is detected even where it leaves valid JSON and valid offsets. It has a
        # key of its own: one changed byte cannot remove both it and the document.
        metadata = {"format": "pt", METADATA_KEY: json.dumps(document, separators=(",", ":"))}
        return {**metadata, DIGEST_KEY: layout_digest(entries, metadata)}

    if data is None:
        write_safetensors(f, tensors, sealed)
    else:
        write_safetensors(f, tensors, sealed, data)


def write_pack(f: BinaryIO, tensors: dict[str, torch.Tensor]) -> None:
    """Write a flat table of distinct tensors as a torchkeep file whose keys are the table's.

    Its header says ``"kind": "torchkeep-pack"``: the writer's sweep deletes only files that do.
    """
    document = {
        "kind": PACK_KIND,
        **version_block(),
        "skeleton": {"$": "dict", "v": {k: {"$": "tensor", "k": k} for k in tensors}},
        "raw": raw_dtypes(tensors),
        "metadata": {},
    }
    _write_sealed(f, tensors, document)


class SafetensorsFile:
    """A safetensors file opened for reading; a torchkeep file when its header says so."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.mapped = MappedFile(path)
        track(self.mapped)  # for loads that read its tensors straight into parameters
        self.header = read_header(self.mapped)
        self.document: dict[str, Any] | None = None
        text = self.header.metadata.get(METADATA_KEY)
        self._check_seal()
        if text is not None:
            doc = parse_json(text, what="torchkeep header", path=path)
            if not isinstance(doc, dict) or "skeleton" not in doc:
                raise CorruptCheckpointError("the torchkeep header has no skeleton", path=path)
            check_format_version(doc.get("format_version"), path=path)
            if not isinstance(doc.get("raw", {}), dict) or not isinstance(
                doc.get("metadata", {}), dict
            ):
                raise CorruptCheckpointError("the torchkeep header is malformed", path=path)
            self.document = doc

    def _check_seal(self) -> None:
        """Compare the header with the digest torchkeep recorded in it (torchkeep files only)."""
        metadata = dict(self.header.metadata)
        recorded = metadata.pop(DIGEST_KEY, None)
        if recorded is None and METADATA_KEY not in metadata:
            return  # a plain safetensors file
        if recorded is None or METADATA_KEY not in metadata:
            raise CorruptCheckpointError(
                "the torchkeep header is incomplete: the file was altered or damaged",
                path=self.path,
            )
        if layout_digest(header_entries(self.header), metadata) != recorded:
            raise CorruptCheckpointError(
                "the header does not match its digest: the file was altered or damaged",
                path=self.path,
            )
        # The digest covers every value of the header; what JSON and safetensors leave free
        # around the values (whitespace, escapes, the padding spaces) must be exactly what the
        # writer produced, so that no byte of the header escapes the seal.
        raw = self.mapped.read(8, self.header.data_start)
        parsed = parse_json(raw, what="safetensors header", path=self.path)
        if raw != canonical_header(parsed) or not _in_writer_order(parsed):
            raise CorruptCheckpointError(
                "the header is not laid out as torchkeep writes it (its spacing, padding or "
                "escapes changed): the file was altered or damaged",
                path=self.path,
            )

    @property
    def format(self) -> str:
        return "torchkeep" if self.document is not None else "safetensors"

    @property
    def format_version(self) -> str | None:
        return None if self.document is None else str(self.document["format_version"])

    @property
    def metadata(self) -> dict[str, Any]:
        if self.document is not None:
            return dict(self.document.get("metadata", {}))
        return {k: v for k, v in self.header.metadata.items() if k not in ("format", DIGEST_KEY)}

    @property
    def skeleton(self) -> Any:
        if self.document is not None:
            return self.document["skeleton"]
        return {"$": "dict", "v": {k: {"$": "tensor", "k": k} for k in self.header.entries}}

    def dtype_shape(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """The true dtype and shape of stored tensor ``key``."""
        entry = self.entry(key)
        raws = (self.document or {}).get("raw", {})
        if key not in raws:  # a stored null is no raw entry the writer made: malformed below
            return entry.dtype, entry.shape
        raw = raws[key]
        try:
            name, numel = raw["dtype"], shape_numel(raw["shape"])
            if numel is None:
                raise ValueError(f"invalid shape {str(raw['shape'])[:200]}")
            shape = tuple(raw["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpointError(
                f"bad raw entry for {key!r}: {exc}", path=self.path, key=key
            ) from exc
        dtype = tensor_dtype_from_name(name, path=self.path, key=key)
        if entry.code != "U8" or numel * dtype.itemsize != entry.nbytes:
            raise CorruptCheckpointError(
                f"tensor {key!r}: {name} {list(shape)} does not match its {entry.nbytes} bytes",
                path=self.path,
                key=key,
            )
        return dtype, shape

    def entry(self, key: Any) -> Any:
        try:
            return self.header.entries[key]
        except (KeyError, TypeError):
            raise CorruptCheckpointError(
                f"the structure refers to tensor {key!r}, which the file does not contain",
                path=self.path,
                key=str(key),
                hint="the file was altered or truncated; restore it from a copy",
            ) from None

    def tensor(self, key: str, *, fetch: bool = True) -> torch.Tensor:
        """Stored tensor ``key``, mapped lazily from the file (no bytes read until used).

        ``fetch=False``: a remote object's bytes are not downloaded yet (``_deferred.py``).
        """
        entry = self.entry(key)
        dtype, shape = self.dtype_shape(key)
        return self.mapped.tensor(entry.start, entry.end, dtype, shape, fetch=fetch)

    def prefetch(self, keys: Iterable[str]) -> None:
        """Start downloading the tensors ``keys`` of a remote object (nothing for a local file)."""
        if self.mapped.lazy:
            entries = self.header.entries
            self.mapped.prefetch((e.start, e.end) for k in keys if (e := entries.get(k)))

    def load(
        self,
        *,
        map_location: MapLocation = None,
        dtype: torch.dtype | None = None,
        verify: bool = True,
    ) -> Any:
        """Rebuild the saved structure: ties restored, tensors mmap-backed while on the CPU.

        With ``verify``, each tensor of a torchkeep file is first checked against the hash in
        its header (reading it); plain safetensors files carry no hashes.
        """
        deferred = current_deferred() if self.mapped.lazy else None
        if deferred is not None:
            return self._load_deferred(deferred, map_location, dtype, verify)
        if verify:
            self.verify()
        else:
            self.prefetch(self.header.entries)
        return rebuild(
            self.skeleton, self.tensor, map_location=map_location, dtype=dtype, source=self.path
        )

    def _load_deferred(
        self,
        deferred: Deferred,
        map_location: MapLocation,
        dtype: torch.dtype | None,
        verify: bool,
    ) -> Any:
        """:meth:`load` with each tensor fetched and checked only when the caller uses it."""
        hashes = self.hashes if verify else {}

        def cut(key: str) -> torch.Tensor:
            t = self.tensor(key, fetch=False)
            entry = self.entry(key)
            check = None
            if key in hashes:
                expected = hashes[key]

                def check(t: torch.Tensor) -> None:
                    if not (isinstance(expected, str) and hash_matches(t, expected)):
                        raise self._damaged_error(key)

            deferred.add(t, self.mapped, entry.start, entry.end, check)
            return t

        return rebuild(
            self.skeleton,
            cut,
            map_location=map_location,
            dtype=dtype,
            source=self.path,
            ready=lambda t: deferred.materialize([t]),
        )

    def _damaged_error(self, key: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"tensor {key!r} does not match its hash: the file was altered or damaged",
            path=self.path,
            key=key,
            hint="restore the file from a copy; verify=False loads it anyway",
        )

    def verify(self) -> None:
        """Check every stored tensor against its recorded hash, dropping its pages afterwards.

        Raises:
            CorruptCheckpointError: naming the first tensor whose bytes changed.
        """
        for key in self.damaged(first_only=True):
            raise self._damaged_error(key)

    @property
    def hashes(self) -> dict[str, Any]:
        """The recorded hash of each stored tensor (empty for a plain safetensors file)."""
        hashes = (self.document or {}).get("hashes", {})
        if not isinstance(hashes, dict):
            raise CorruptCheckpointError("the recorded hashes are malformed", path=self.path)
        return hashes

    def damaged(self, *, first_only: bool = False) -> list[str]:
        """The keys of every stored tensor whose bytes do not match its recorded hash."""
        bad: list[str] = []
        self.prefetch(self.hashes)  # a remote object: every range in flight, not one at a time
        for key, expected in self.hashes.items():
            t = self.tensor(key)
            ok = isinstance(expected, str) and hash_matches(t, expected)
            self.mapped.release(t)  # keep memory near zero while reading a whole file
            if not ok:
                bad.append(key)
                if first_only:
                    break
        return bad


def _in_writer_order(header: dict[str, Any]) -> bool:
    """Keys as the writer orders them: metadata first (format, document, digest), then the
    tensors by offset, each as dtype, shape, data_offsets. Only entries with the same offsets
    (empty tensors at one place) may come in any order: swapping them changes nothing read."""
    keys = list(header)
    if not keys or keys[0] != "__metadata__":
        return False
    if list(header["__metadata__"]) != ["format", METADATA_KEY, DIGEST_KEY]:
        return False
    entries = [header[k] for k in keys[1:]]
    if any(list(e) != ["dtype", "shape", "data_offsets"] for e in entries):
        return False
    offsets = [tuple(e["data_offsets"]) for e in entries]
    return offsets == sorted(offsets)
