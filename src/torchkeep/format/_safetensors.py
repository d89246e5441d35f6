"""The safetensors layout: a strict header parser, a streaming writer, lazy mmap reads.

The layout (https://github.com/huggingface/safetensors) is an 8-byte little-endian header length
``N``, ``N`` bytes of JSON mapping each tensor name to ``{"dtype", "shape", "data_offsets"}`` (plus
an optional ``"__metadata__"`` of strings), then the tensor bytes, packed with no holes.

We write and parse it here rather than through ``safetensors.torch`` for three reasons:

* ``save_file`` turns every tensor into a ``bytes`` copy first, doubling memory; the writer below
  streams each tensor's own memory to the file.
* ``load_into`` reads a tensor straight into a parameter's memory (``os.preadv``), which needs the
  byte offsets that ``safe_open`` does not expose.
* Hostile files must fail with a precise :class:`CorruptCheckpointError` before any data is read.

Files written here are plain safetensors files that ``safetensors.torch.load_file`` reads; the
header is padded with spaces (as the format allows) so that tensor data starts 64-byte aligned,
and tensors are ordered by element size so that every tensor is aligned for its dtype.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch
import xxhash

from torchkeep.errors import CorruptCheckpointError
from torchkeep.format._dtypes import SAFETENSORS_DTYPES, TORCH_TO_SAFETENSORS, shape_numel
from torchkeep.format._json import parse_json
from torchkeep.storage import storage_for

HEADER_LIMIT = 100 * 1024 * 1024  # the limit safetensors itself enforces
ALIGN = 64
_HINT = "the file is damaged or not a safetensors file; restore it from a copy"


@dataclass(frozen=True, slots=True)
class Entry:
    """One tensor of a safetensors file: where its bytes are and how to read them."""

    key: str
    code: str  # safetensors dtype code, e.g. "F32"
    shape: tuple[int, ...]
    start: int  # absolute offset of the first byte in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def dtype(self) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.code]


@dataclass(frozen=True, slots=True)
class Header:
    """A validated safetensors header."""

    path: str
    entries: dict[str, Entry]  # in file order
    metadata: dict[str, str]
    data_start: int
    file_size: int


def _is_int(x: Any) -> bool:
    return type(x) is int and x >= 0


class MappedFile:
    """A file mapped copy-on-write: tensors cut from it are read from disk on first use.

    The file is opened and mapped once, so the header and every tensor come from the same file
    even if another process replaces the path meanwhile. Each tensor gets a storage of its own
    that points into the mapping, so a tensor taken out of a loaded checkpoint and saved again
    with ``torch.save`` carries only its own bytes.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        mapped = storage_for(path).map(path)  # one open, one mmap, no read
        self.size = mapped.size
        self.identity = mapped.identity
        self._map = mapped.buffer
        self._fetch = mapped.fetch  # a remote object: byte ranges are downloaded on first use
        self._prefetch = mapped.prefetch
        self._addr = 0
        if self._map is not None:
            anchor = ctypes.c_char.from_buffer(self._map)
            self._addr = ctypes.addressof(anchor)
            del anchor  # releases the buffer export

    @property
    def lazy(self) -> bool:
        """Whether bytes must be fetched before they are read (a remote object)."""
        return self._fetch is not None

    def fetch(self, start: int, end: int) -> None:
        """Make the bytes ``[start, end)`` valid (download them from a remote object)."""
        if self._fetch is not None:
            self._fetch(start, end)

    def prefetch(self, spans: Iterable[tuple[int, int]]) -> None:
        """Start downloading the ``(start, end)`` ranges a reader is about to go through."""
        if self._prefetch is not None:
            self._prefetch(spans)

    def read(self, start: int, end: int) -> bytes:
        if self._fetch is not None:
            self._fetch(start, end)
        return b"" if self._map is None else bytes(self._map[start:end])  # no copy for mmap

    def tensor(
        self,
        start: int,
        end: int,
        dtype: torch.dtype,
        shape: Iterable[int],
        *,
        fetch: bool = True,
    ) -> torch.Tensor:
        """The bytes ``[start, end)`` as a tensor of ``dtype`` and ``shape`` (copied if misaligned).

        ``fetch=False`` leaves a remote object's bytes to be fetched later (:meth:`fetch`): the
        tensor's memory is not valid until then (a misaligned tensor is fetched anyway, to copy).
        """
        shape = tuple(shape)
        if start == end or self._map is None:
            return torch.empty(shape, dtype=dtype)
        if fetch:
            self.fetch(start, end)
        count = (end - start) // dtype.itemsize
        t = torch.frombuffer(self._map, dtype=dtype, count=count, offset=start)
        if t.data_ptr() % dtype.itemsize:
            self.fetch(start, end)
            t = t.clone()
        return t.reshape(shape)

    def offset_of(self, t: torch.Tensor) -> int | None:
        """The file offset of a contiguous tensor cut from this mapping, else ``None``."""
        if self._map is None or t.device.type != "cpu" or not t.is_contiguous():
            return None
        offset = t.data_ptr() - self._addr
        if offset >= 0 and offset + t.numel() * t.element_size() <= self.size:
            return offset
        return None

    def release(self, t: torch.Tensor) -> None:
        """Drop the pages of a tensor cut from this mapping (re-read from disk if used again).

        Only for tensors nobody has written to: private pages that were modified are lost.
        """
        offset = self.offset_of(t)
        if offset is None or not isinstance(self._map, mmap.mmap) or self._fetch is not None:
            return  # a fetched buffer has no file behind it to re-read pages from
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = offset - offset % mmap.PAGESIZE
        self._map.madvise(mmap.MADV_DONTNEED, start, offset + t.numel() * t.element_size() - start)


def read_header(mapped: MappedFile) -> Header:
    """Read and validate the header of a mapped safetensors file.

    Checks the declared header length against the file size, that the JSON is an object without
    duplicate keys, that every dtype is known and every shape matches its byte count, and that the
    tensors tile the data region exactly (no overlap, no hole, nothing out of bounds or trailing).

    Raises:
        CorruptCheckpointError: on any violation, naming the tensor at fault.
    """
    path, size = mapped.path, mapped.size

    def bad(msg: str, key: str | None = None) -> CorruptCheckpointError:
        return CorruptCheckpointError(msg, path=path, key=key, hint=_HINT)

    if size < 8:
        raise bad(f"too small to be a safetensors file ({size} bytes)")
    (n,) = struct.unpack("<Q", mapped.read(0, 8))
    if n > HEADER_LIMIT:
        raise bad(f"the header claims {n} bytes, more than the {HEADER_LIMIT}-byte limit")
    if 8 + n > size:
        raise bad(f"truncated: the header claims {n} bytes but the file has only {size}")
    header = parse_json(mapped.read(8, 8 + n), what="safetensors header", path=path)
    if not isinstance(header, dict):
        raise bad("the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise bad("__metadata__ must map strings to strings")
    data_start = 8 + n
    entries: list[Entry] = []
    for key, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {key!r} needs exactly dtype, shape and data_offsets", key)
        code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(code, str) or code not in SAFETENSORS_DTYPES:
            raise bad(f"tensor {key!r} has an unsupported dtype {code!r}", key)
        numel = shape_numel(shape) if isinstance(shape, list) else None
        if numel is None:
            raise bad(f"tensor {key!r} has an invalid shape {str(shape)[:200]}", key)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
            raise bad(f"tensor {key!r} has invalid data_offsets {offsets!r}", key)
        begin, end = offsets
        expected = numel * SAFETENSORS_DTYPES[code].itemsize
        if end - begin != expected:
            raise bad(
                f"tensor {key!r}: dtype {code} and shape {shape} need {expected} bytes "
                f"but data_offsets give {end - begin}",
                key,
            )
        entries.append(Entry(key, code, tuple(shape), data_start + begin, data_start + end))
    entries.sort(key=lambda e: (e.start, e.end))
    position = data_start
    for e in entries:
        if e.start != position:
            kind = (
                "overlaps the previous tensor" if e.start < position else "leaves a gap before it"
            )
            raise bad(f"tensor {e.key!r} {kind} (offset {e.start - data_start})", e.key)
        position = e.end
    if position > size:
        raise bad(f"truncated: tensors need {position} bytes but the file has only {size}")
    if position < size:
        raise bad(f"{size - position} unexpected bytes after the last tensor")
    return Header(path, {e.key: e for e in entries}, metadata, data_start, size)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of ``t`` in row-major order, without a copy when ``t`` is a contiguous CPU tensor."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if t.numel() == 0:
        return memoryview(b"")
    if t.element_size() == 1 and not t.is_contiguous():
        # torch has no copy kernel for the sub-byte dtypes (uint4...): copy their bytes instead
        t = t.view(torch.uint8)
    flat = t.contiguous().reshape(-1)
    if flat.stride(0) != 1:  # torch calls a one-element view contiguous whatever its stride
        flat = torch.empty_like(flat, memory_format=torch.contiguous_format).copy_(flat)
    return memoryview(flat.view(torch.uint8).numpy())  # type: ignore[arg-type]  # numpy stubs give ndarray __buffer__ on 3.12+ only


def raw_dtypes(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """The tensors safetensors has no dtype for, with their true dtype and shape."""
    return {
        key: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
        for key, t in tensors.items()
        if t.dtype not in TORCH_TO_SAFETENSORS
    }


def write_safetensors(
    f: BinaryIO,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | Callable[[dict[str, Any]], dict[str, str]],
    data: Callable[[str], Iterable[memoryview]] | None = None,
) -> None:
    """Stream ``tensors`` to ``f`` in the safetensors layout.

    Tensors whose dtype safetensors does not know are written as raw ``U8`` bytes (see
    :func:`raw_dtypes`). ``metadata`` may be a function of the tensor entries (dtype, shape,
    data_offsets by key), for metadata that seals the layout. ``data(key)``, when given, yields
    the bytes of tensor ``key`` in pieces (the table then gives only dtypes and shapes).
    """
    order = sorted(tensors, key=lambda k: -tensors[k].element_size())  # stable: keeps key order
    header: dict[str, Any] = {}
    offset = 0
    for key in order:
        t = tensors[key]
        nbytes = t.numel() * t.element_size()
        code = TORCH_TO_SAFETENSORS.get(t.dtype)
        if code is None:
            header[key] = {
                "dtype": "U8",
                "shape": [nbytes],
                "data_offsets": [offset, offset + nbytes],
            }
        else:
            header[key] = {
                "dtype": code,
                "shape": list(t.shape),
                "data_offsets": [offset, offset + nbytes],
            }
        offset += nbytes
    meta = metadata(dict(header)) if callable(metadata) else metadata
    if meta:
        header = {"__metadata__": meta, **header}
    blob = canonical_header(header)
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for key in order:
        if data is None:
            f.write(tensor_bytes(tensors[key]))
            continue
        written = 0
        for piece in data(key):
            f.write(piece)
            written += memoryview(piece).nbytes
        if written != header[key]["data_offsets"][1] - header[key]["data_offsets"][0]:
            raise ValueError(f"tensor {key!r}: {written} bytes written, not its size")


def canonical_header(header: dict[str, Any]) -> bytes:
    """The header bytes this module writes for ``header``: compact ASCII JSON in the given key
    order, padded with spaces so that tensor data starts ``ALIGN``-byte aligned."""
    blob = json.dumps(header, separators=(",", ":")).encode("ascii")
    return blob + b" " * ((-(8 + len(blob))) % ALIGN)


def read_into(fd: int, start: int, nbytes: int, out: torch.Tensor, *, path: str) -> None:
    """Read ``nbytes`` at ``start`` straight into the memory of the contiguous CPU tensor ``out``."""
    if nbytes == 0:
        return
    view = memoryview(out.detach().reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]  # numpy stubs give ndarray __buffer__ on 3.12+ only
    done = 0
    while done < nbytes:
        n = os.preadv(fd, [view[done:]], start + done)
        if n <= 0:
            raise CorruptCheckpointError(
                f"truncated: expected {nbytes} bytes at offset {start}", path=path, hint=_HINT
            )
        done += n


def layout_digest(entries: dict[str, Any], metadata: dict[str, str]) -> str:
    """A digest of a header's tensor entries and metadata (in canonical JSON), for sealing."""
    canonical = json.dumps(
        {"tensors": entries, "metadata": metadata}, sort_keys=True, separators=(",", ":")
    )
    return "xxh3_128:" + xxhash.xxh3_128_hexdigest(canonical.encode())


def header_entries(header: Header) -> dict[str, Any]:
    """The tensor entries of a parsed header, as the writer laid them out."""
    return {
        e.key: {
            "dtype": e.code,
            "shape": list(e.shape),
            "data_offsets": [e.start - header.data_start, e.end - header.data_start],
        }
        for e in header.entries.values()
    }
