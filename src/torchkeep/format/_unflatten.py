"""Rebuilding a nested state from its JSON skeleton and its tensors: :func:`flatten`'s inverse.

The skeleton comes from a file, so it is parsed as hostile: every node is checked against the
closed set of kinds ``_skeleton.py`` writes (nothing is imported or executed), with a depth
limit, and a damaged node raises :class:`CorruptCheckpointError` naming where it is.
"""

from __future__ import annotations

import base64
import math
import os
import pathlib
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.torch_version import TorchVersion

from torchkeep.errors import CorruptCheckpointError, InvalidArgumentError
from torchkeep.format._dtypes import dtype_from_name
from torchkeep.format._safe_values import numpy_dtype
from torchkeep.format._skeleton import _INT64, MAX_DEPTH


class _Decoder:
    def __init__(
        self, tensor: Callable[[dict[str, Any]], torch.Tensor], source: str | None
    ) -> None:
        self.tensor = tensor
        self.source = source

    def fail(self, what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"the checkpoint's structure is damaged: {what}",
            path=self.source,
            hint="the file was altered or written by an incompatible tool; restore it from a copy",
        )

    def decode(self, node: Any, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise self.fail(f"nested deeper than {MAX_DEPTH} levels")
        if node is None or isinstance(node, bool | int | float | str):
            return node
        if not isinstance(node, dict) or not isinstance(node.get("$"), str):
            raise self.fail(f"unexpected node {str(node)[:80]!r}")
        tag = node["$"]
        v = node.get("v")
        try:
            if tag == "dict":
                return self._dict(node, depth)
            if tag in ("list", "tuple", "set", "frozenset"):
                if not isinstance(v, list):
                    raise self.fail(f"a {tag} without items")
                items = [self.decode(x, depth + 1) for x in v]
                return {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}[tag](
                    items
                )
            if tag == "tensor":
                return self.tensor(node)
            if tag == "ndarray":
                return self._ndarray(node)
            if tag == "float":
                return float(v)  # type: ignore[arg-type]  # JSON; a bad v raises, caught below
            if tag == "complex":
                re, im = (self.decode(x, depth + 1) for x in v)  # type: ignore[union-attr]  # JSON; a bad v raises, caught below
                return complex(re, im)
            if tag == "bytes":
                return base64.b64decode(v, validate=True)  # type: ignore[arg-type]  # JSON; a bad v raises, caught below
            if tag == "size":
                if not (
                    isinstance(v, list) and all(type(d) is int and _INT64 <= d < -_INT64 for d in v)
                ):
                    raise self.fail(f"a torch.Size of {str(v)[:80]}")
                return torch.Size(v)
            if tag == "dtype":
                return dtype_from_name(v, path=self.source)  # type: ignore[arg-type]  # JSON; a bad v raises, caught below
            if tag == "device":
                return torch.device(v)  # type: ignore[arg-type]  # JSON; a bad v raises, caught below
            if tag == "np":
                return self._np(node, depth)
            if tag == "np_dtype":
                return numpy_dtype(v)
            if tag == "torch_version":
                if type(v) is not str:
                    raise self.fail("a torch version that is not a string")
                return TorchVersion(v)
            if tag == "path":
                return _path(node)
        # OverflowError: a crafted 400-digit number as a float, complex or numpy scalar
        except (
            TypeError,
            ValueError,
            KeyError,
            RuntimeError,
            AttributeError,
            OverflowError,
        ) as exc:
            if isinstance(exc, CorruptCheckpointError | InvalidArgumentError):  # a bad map_location
                raise
            raise self.fail(f"bad {tag!r} node ({exc})") from exc
        raise self.fail(f"unknown node kind {tag!r} (written by a newer torchkeep?)")

    def _ndarray(self, node: dict[str, Any]) -> np.ndarray[Any, Any]:
        array = self.tensor(node).detach().cpu().numpy()
        if "dtype" not in node:
            return array
        dtype = numpy_dtype(node["dtype"])
        if not node.get("raw"):
            return array.astype(dtype)
        shape = node.get("shape")
        if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)):
            raise self.fail(f"a numpy array with shape {str(shape)[:40]!r}")
        if array.dtype != np.uint8 or array.size != math.prod(shape) * dtype.itemsize:
            raise self.fail(f"a numpy {dtype} array of shape {shape} with {array.nbytes} bytes")
        return np.frombuffer(array.tobytes(), dtype=dtype).reshape(shape).copy()

    def _np(self, node: dict[str, Any], depth: int) -> Any:
        dtype = numpy_dtype(node["dtype"])
        if "raw" in node:
            data = base64.b64decode(node["raw"], validate=True)
            if len(data) != dtype.itemsize:
                raise self.fail(f"a numpy {dtype} scalar of {len(data)} bytes")
            return np.frombuffer(data, dtype=dtype)[0]
        value = self.decode(node.get("v"), depth + 1)
        with warnings.catch_warnings():
            # A value out of the dtype's range (never written: it came from that dtype)
            warnings.simplefilter("error", RuntimeWarning)
            try:
                return dtype.type(value)
            except RuntimeWarning as exc:
                raise self.fail(f"numpy {dtype} scalar out of range ({exc})") from None

    def _dict(self, node: dict[str, Any], depth: int) -> dict[Any, Any]:
        out: dict[Any, Any] = OrderedDict() if node.get("ordered") else {}
        if isinstance(node.get("v"), dict):
            for k, v in node["v"].items():
                out[k] = self.decode(v, depth + 1)
        elif isinstance(node.get("items"), list):
            for item in node["items"]:
                if not (isinstance(item, list) and len(item) == 2):
                    raise self.fail("a dict item that is not a pair")
                out[self.decode(item[0], depth + 1)] = self.decode(item[1], depth + 1)
        else:
            raise self.fail("a dict without items")
        if "meta" in node and isinstance(out, OrderedDict):
            out._metadata = self.decode(node["meta"], depth + 1)  # type: ignore[attr-defined]  # torch's state-dict _metadata
        return out


def _path(node: dict[str, Any]) -> pathlib.PurePath:
    text, flavour, pure = node.get("v"), node.get("flavour"), node.get("pure")
    if type(text) is not str or flavour not in ("posix", "windows") or type(pure) is not bool:
        raise ValueError("a path node without its text, flavour or kind")
    parts = node.get("parts")
    if parts is not None and not (isinstance(parts, list) and all(type(p) is str for p in parts)):
        raise ValueError("a path node whose parts are not strings")
    cls: type[pathlib.PurePath]
    if flavour == "posix":
        concrete = not pure and os.name == "posix"  # a PosixPath cannot be made on Windows
        cls = pathlib.PosixPath if concrete else pathlib.PurePosixPath
    else:
        concrete = not pure and os.name == "nt"
        cls = pathlib.WindowsPath if concrete else pathlib.PureWindowsPath
    path = cls(text)
    if parts is not None and list(path.parts) != parts:
        # A few texts parse back as another path ('//://' on Windows); their parts do not
        joined = cls(*parts)
        if list(joined.parts) == parts:
            return joined
    return path


def unflatten(
    skeleton: Any,
    tensor: Callable[[dict[str, Any]], torch.Tensor],
    *,
    source: str | None = None,
) -> Any:
    """Rebuild the tree described by ``skeleton``.

    Args:
        skeleton: the JSON skeleton written by :func:`flatten`.
        tensor: returns the tensor for a tensor node (reads ``node["k"]`` and ``node.get("view")``).
        source: the file being read, for error messages.

    Raises:
        CorruptCheckpointError: the skeleton is malformed.
    """
    try:
        return _Decoder(tensor, source).decode(skeleton)
    except RecursionError as exc:
        raise CorruptCheckpointError(
            "the checkpoint's structure is nested too deeply", path=source
        ) from exc
