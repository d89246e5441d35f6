"""Strict, bounded JSON: every JSON document torchkeep reads (headers, manifests, records)."""

from __future__ import annotations

import json
import math
from typing import Any

from torchkeep.errors import CorruptCheckpointError

JSON_LIMIT = 100 * 1024 * 1024  # safetensors' own header limit, for any JSON document read
JSON_MAX_CONTAINERS = 4_000_000  # ~10 per tensor for 100,000 tensors, with room to spare
JSON_MAX_DEPTH = 640  # a skeleton nests up to 200 levels (MAX_DEPTH), 3 JSON levels each at most
_HINT = "the file is damaged or not a safetensors file; restore it from a copy"


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"invalid JSON constant {name}")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses as inf, which int() and friends refuse
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _depth_exceeds(doc: Any, limit: int) -> bool:
    """Whether containers nest deeper than ``limit`` in ``doc`` (walked without recursion)."""
    stack: list[tuple[Any, int]] = [(doc, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def parse_json(data: bytes | str, *, what: str, path: str, max_bytes: int = JSON_LIMIT) -> Any:
    """Parse JSON strictly, within bounds a real checkpoint never reaches.

    Duplicate keys, NaN, Infinity and numbers beyond a float's range are errors, and so are a
    document over ``max_bytes``, more than :data:`JSON_MAX_CONTAINERS` objects and arrays
    (each costs ~100 bytes of memory for two of the file) and nesting deeper than
    :data:`JSON_MAX_DEPTH`, so that a crafted document is refused before it can exhaust memory
    or the stack of whatever walks it next.
    """

    def bad(why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"the {what} is not valid JSON: {why}", path=path, hint=_HINT)

    if len(data) > max_bytes:
        raise bad(f"{len(data)} bytes, over the {max_bytes}-byte limit")
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    # every container starts with one of these bytes (an upper bound: strings may hold them too)
    openers = raw.count(b"{") + raw.count(b"[")
    if openers > JSON_MAX_CONTAINERS:
        raise bad(f"{openers} objects and arrays, over the limit of {JSON_MAX_CONTAINERS}")
    try:
        doc = json.loads(
            data,
            object_pairs_hook=_reject_duplicates,
            parse_constant=_no_constant,
            parse_float=_finite_float,
        )
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise bad(str(exc)) from exc
    if openers > JSON_MAX_DEPTH and _depth_exceeds(doc, JSON_MAX_DEPTH):
        raise bad(f"nested deeper than {JSON_MAX_DEPTH} levels")
    return doc
