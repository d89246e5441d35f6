"""Shared by the hypothesis and atheris fuzzers: sealed documents with one value replaced.

A fuzzed document only reaches the checks behind torchkeep's seals when it is sealed again, as
the writer seals it: the safetensors header's layout digest and the manifest's own digest are
recomputed after every mutation. The decode entry points then may return or raise a
:class:`~torchkeep.TorchkeepError`; anything else (or a crash) is a finding.
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import torchkeep as tk
from torchkeep.format._artifact import DIGEST_KEY, METADATA_KEY
from torchkeep.format._hash import seal_json
from torchkeep.format._run import RunReader, read_manifest
from torchkeep.format._safetensors import layout_digest

Path_ = tuple[Any, ...]

#: Values a red team reaches for: beyond float and int64 range, digits int() refuses,
#: every dtype torch names (the quantized ones included), lone surrogates, tags.
HOSTILE_ATOMS: list[Any] = [
    10**400,
    -(10**400),
    2**63,
    2**64,
    -1,
    0,
    1e308,
    -0.0,
    5e-324,
    "²",
    "١",
    "1" * 5000,
    "99.0",
    "",
    "\x00",
    "\ud800",
    "inf",
    "-inf",
    "nan",
    "1e999",
    "cuda:0",
    "meta",
    "mps",
    "<f2",
    "|O",
    "<U5",
    "V8",
    "====",
    "tensor",
    "xxh3_128:",
    [],
    {},
    None,
    True,
    [2**62, 2**62],
    [-1],
    [0, 2**63],
    {"$": "tensor", "k": "f"},
    {"$": "np", "dtype": "<i1", "v": 300},
    {"$": "complex", "v": [10**400, 1]},
] + sorted(
    str(v).removeprefix("torch.") for v in vars(torch).values() if isinstance(v, torch.dtype)
)


HOSTILE_NUMBERS: list[Any] = [10**400, -(10**400), 2**63, 2**64, -1, 10**20, 300, 1e308, 5e-324]
HOSTILE_NUMBERS += [1.5, -0.0, True]
HOSTILE_STRINGS: list[Any] = [a for a in HOSTILE_ATOMS if isinstance(a, str)] + ["1.x", " 1", "1.0"]


def hostile_choices(original: Any) -> list[Any]:
    """Values to put where ``original`` was: of its kind first, so most mutations get past
    the type checks to the range and format checks behind them."""
    if isinstance(original, bool) or original is None:
        return [not original, 0, "true", *HOSTILE_NUMBERS[:4]]
    if isinstance(original, int | float):
        return HOSTILE_NUMBERS + [original + 1, -original, original * 2**40]
    if isinstance(original, str):
        return HOSTILE_STRINGS + [original + "x", original[:-1], original * 3]
    if isinstance(original, list):
        return [[], [2**62] * 3, [-1], [10**400], [original], original * 2, original[:-1]]
    return [{}, [], None, {"$": "tensor"}, {"$": "dict", "items": [[[], 1]]}]


def rich_state() -> dict[str, Any]:
    """One of every kind of value the skeleton stores, views and a raw dtype included."""
    f = torch.arange(8, dtype=torch.float32)
    return {
        "w": torch.zeros(2, dtype=torch.complex128),  # stored raw (U8) with its true dtype
        "f": f,
        "v": f[2:6],
        "t": f.view(2, 4).t(),
        "n": np.float32(1.5),
        "s": torch.Size([2, 3]),
        "d": torch.bfloat16,
        "dev": torch.device("cpu"),
        "b": b"x",
        "c": 1 + 2j,
        "tu": (1, 2.5),
        "set": {1},
        "od": OrderedDict(a=1),
        "arr": np.array([1, 2]),
        "inf": float("inf"),
        "ik": {1: "x"},
        "p": torch.nn.Parameter(torch.ones(2)),
    }


def read_file(path: Path) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    """The tensor entries, the torchkeep document and the data bytes of a torchkeep file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__")
    return header, json.loads(meta[METADATA_KEY]), raw[8 + n :]


def write_sealed_file(
    path: Path, entries: Any, doc: Any, data: bytes, *, text: str | None = None
) -> None:
    """A torchkeep file of ``entries`` and ``doc`` (or the document's JSON ``text``), sealed as
    the writer seals it."""
    meta = {"format": "pt", METADATA_KEY: json.dumps(doc) if text is None else text}
    try:
        digest = layout_digest(entries, meta)
    except (TypeError, ValueError):  # entries json cannot write canonically: seal them as text
        digest = "xxh3_128:" + "0" * 32
    header = {"__metadata__": {**meta, DIGEST_KEY: digest}}
    if isinstance(entries, dict):
        # As the writer lays them out (tensors by offset, compact ASCII JSON), so that the
        # layout check passes and the mutation reaches the checks behind it
        header.update(sorted(((k, v) for k, v in entries.items() if k != "__metadata__"), key=_at))
    blob = json.dumps(header, separators=(",", ":")).encode("ascii")
    blob += b" " * ((-(8 + len(blob))) % 64)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def _at(item: tuple[str, Any]) -> tuple[int, int]:
    """Where an entry's data starts, for the writer's order (0 for a mutated entry)."""
    offsets = item[1].get("data_offsets") if isinstance(item[1], dict) else None
    ok = isinstance(offsets, list) and all(type(o) is int for o in offsets) and len(offsets) == 2
    return (offsets[0], offsets[1]) if ok else (0, 0)


def write_sealed_manifest(path: Path, doc: Any, *, text: str | None = None) -> None:
    """A manifest of ``doc`` (or of the JSON ``text``), sealed when it is a non-empty object."""
    raw = json.dumps(doc, separators=(",", ":")) if text is None else text
    data = raw.encode("utf-8", "surrogatepass")
    with contextlib.suppress(ValueError):  # not an object: unsealed, refused by the seal check
        data = seal_json(data)
    path.write_bytes(data)


def paths(tree: Any, prefix: Path_ = (), limit: int = 400) -> list[Path_]:
    """Every path to a value in a JSON tree (the root included), breadth first."""
    found: list[Path_] = [prefix]
    todo: list[tuple[Any, Path_]] = [(tree, prefix)]
    while todo and len(found) < limit:
        node, at = todo.pop(0)
        items = (
            node.items()
            if isinstance(node, dict)
            else enumerate(node)
            if isinstance(node, list)
            else ()
        )
        for k, v in items:
            found.append((*at, k))
            todo.append((v, (*at, k)))
    return found


def replaced(tree: Any, path: Path_, value: Any) -> Any:
    """A deep copy of ``tree`` with the value at ``path`` replaced (or deleted for ``...``)."""
    if not path:
        return value
    copy = json.loads(json.dumps(tree))
    node = copy
    for k in path[:-1]:
        node = node[k]
    if value is ...:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return copy


def file_entry_points(path: Path) -> dict[str, Callable[[], object]]:
    """Every way a user decodes a single file."""
    return {
        "load": lambda: tk.load(path),
        "load-unverified": lambda: tk.load(path, verify=False),
        "inspect": lambda: tk.inspect(path),
        "load_into": lambda: tk.load_into(_module_of_f(), path, strict=False),
    }


def _module_of_f() -> torch.nn.Module:
    """A module that takes the base file's ``f`` (a load that copies nothing is an error)."""
    module = torch.nn.Module()
    module.register_buffer("f", torch.empty(8))
    return module


def run_entry_points(run: Path, step: int) -> dict[str, Callable[[], object]]:
    """Every way a user decodes a run's checkpoint."""
    manifest = run / "checkpoints" / f"{step:010d}.json"
    return {
        "read_manifest": lambda: read_manifest(manifest),
        "load": lambda: tk.load(f"{run}@{step}"),
        "load-unverified": lambda: tk.load(f"{run}@{step}", verify=False),
        "best": lambda: RunReader(run).best(),
        "inspect": lambda: tk.inspect(f"{run}@{step}"),
    }


def outcome(call: Callable[[], object]) -> str:
    """``"ok"`` or ``"refused"`` (a TorchkeepError); any other exception propagates."""
    try:
        call()
    except tk.TorchkeepError:
        return "refused"
    return "ok"
