"""Flattening a nested state into a tensor table plus a JSON skeleton (back: ``_unflatten.py``).

A checkpoint as users write it is a tree: dicts (with string or integer keys, as in an optimizer's
``state``), lists, tuples, tensors, numbers, strings, ``None`` and the odd values real state dicts
hold (``torch.Size``, ``torch.dtype``, ``torch.device``, ``torch.__version__``, ``pathlib`` paths, numpy
arrays, scalars and dtypes). :func:`flatten` splits it into

* a table of tensors, each under a readable key (the path joined by dots, so a plain state dict
  keeps its own keys and any safetensors reader sees ``fc.weight``), and
* a skeleton: plain JSON that rebuilds the tree. Strings, integers, booleans, ``None`` and finite
  floats are themselves; every container and every other value is an object tagged by ``"$"``.

Tensors that share storage are stored once. Identical views (tied embedding and output weights)
point to the same key and come back as one tensor object; other views of a shared storage (a
weight and its transpose, slices of one buffer) are rebuilt as views of one stored base, so the
aliasing survives the round trip.

Nothing here is ever executed: the skeleton only names a closed set of value kinds.
"""

from __future__ import annotations

import base64
import math
import pathlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.torch_version import TorchVersion

from torchkeep.errors import UnsupportedValueError
from torchkeep.format._dtypes import VIEWABLE_DTYPES, dtype_name
from torchkeep.format._safe_values import numpy_dtype

MAX_DEPTH = 200
_INT64 = -(1 << 63)  # a torch.Size holds int64s
_RESERVED_KEYS = frozenset({"__metadata__"})
_SCALAR_KEY_TYPES = (str, int, float, bool, type(None))
_PATH_TYPES = {
    pathlib.PurePosixPath: ("posix", True),
    pathlib.PureWindowsPath: ("windows", True),
    pathlib.PosixPath: ("posix", False),
    pathlib.WindowsPath: ("windows", False),
}
# numpy dtypes torch has, stored as tensors (native byte order); others are stored as their bytes
_TORCH_HAS = frozenset(
    {"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16"}
)
_NP_HINT = "convert it with .tolist() (object, structured and datetime dtypes are not stored)"


@dataclass(slots=True)
class Flattened:
    """A tree split into its skeleton and the tensors to store, keyed as in the skeleton."""

    skeleton: Any
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def _where(path: tuple[Any, ...]) -> str:
    return "obj" + "".join(f"[{p!r}]" for p in path)


def _unsupported(path: tuple[Any, ...], what: str, hint: str) -> UnsupportedValueError:
    return UnsupportedValueError(
        f"cannot store {what} at {_where(path)}", key=_where(path), hint=hint
    )


class _Flattener:
    def __init__(self) -> None:
        self.leaves: list[tuple[dict[str, Any], torch.Tensor, str]] = []
        self.active: set[int] = set()

    def encode(self, value: Any, path: tuple[Any, ...]) -> Any:
        if len(path) > MAX_DEPTH:
            raise _unsupported(
                path, f"a structure nested deeper than {MAX_DEPTH} levels", "flatten it"
            )
        kind = type(value)
        if value is None or kind is bool or kind is str:
            return value
        if kind is int:
            return value
        if kind is float:
            return value if math.isfinite(value) else {"$": "float", "v": repr(value)}
        if isinstance(value, torch.Tensor):
            return self._tensor(value, path)
        if isinstance(value, np.ndarray):
            return self._ndarray(value, path)
        if isinstance(value, np.generic):
            return self._np_scalar(value, path)
        if isinstance(value, np.dtype):
            return {"$": "np_dtype", "v": _np_dtype_text(value, path, "a numpy dtype")}
        if kind is TorchVersion:
            return {"$": "torch_version", "v": str(value)}
        if kind in _PATH_TYPES:
            flavour, pure = _PATH_TYPES[kind]
            # The parts too: some texts do not parse back to the same path ('//://' on Windows)
            parts = list(value.parts)
            return {"$": "path", "v": str(value), "parts": parts, "flavour": flavour, "pure": pure}
        if kind is complex:
            return {
                "$": "complex",
                "v": [self.encode(value.real, path), self.encode(value.imag, path)],
            }
        if kind is bytes:
            return {"$": "bytes", "v": base64.b64encode(value).decode("ascii")}
        if kind is torch.Size:
            return {"$": "size", "v": list(value)}
        if kind is torch.dtype:
            return {"$": "dtype", "v": dtype_name(value)}
        if kind is torch.device:
            return {"$": "device", "v": str(value)}
        if kind in (dict, OrderedDict, list, tuple, set, frozenset):
            if id(value) in self.active:
                raise _unsupported(path, "a structure that contains itself", "break the cycle")
            self.active.add(id(value))
            try:
                return self._container(value, path)
            finally:
                self.active.discard(id(value))
        if isinstance(value, torch.nn.Module):
            raise _unsupported(
                path,
                f"a torch.nn.Module ({kind.__qualname__})",
                "a module is code plus weights: save its weights with "
                "tk.save(model.state_dict(), path), or the whole model (weights and how to "
                "rebuild it, no pickle) with tk.save_model(model, directory)",
            )
        if isinstance(value, torch.optim.Optimizer):
            raise _unsupported(
                path,
                f"a torch.optim.Optimizer ({kind.__qualname__})",
                "save its state with optimizer.state_dict(), or keep model and optimizer in a "
                "tk.CheckpointManager app, which captures both",
            )
        raise _unsupported(
            path,
            f"a value of type {kind.__module__}.{kind.__qualname__}",
            "torchkeep stores tensors, numbers, strings, bools, None, bytes, numpy arrays, "
            "scalars and dtypes, torch.Size/dtype/device, torch.__version__, pathlib paths "
            "and dicts, lists, tuples and sets of them, never pickled "
            "objects: convert it (vars(args), dataclasses.asdict(cfg), str(path), .tolist()) "
            "or keep it in the metadata as JSON",
        )

    def _container(self, value: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(value, dict):
            node: dict[str, Any] = {"$": "dict"}
            if all(type(k) is str for k in value):
                node["v"] = {k: self.encode(v, (*path, k)) for k, v in value.items()}
            else:
                node["items"] = [
                    [self._key(k, path), self.encode(v, (*path, k))] for k, v in value.items()
                ]
            if type(value) is OrderedDict:
                node["ordered"] = True
                meta = getattr(value, "_metadata", None)
                if meta is not None:
                    node["meta"] = self.encode(meta, (*path, "_metadata"))
            return node
        tag = type(value).__name__
        items = sorted(value, key=repr) if isinstance(value, set | frozenset) else value
        return {"$": tag, "v": [self.encode(v, (*path, i)) for i, v in enumerate(items)]}

    def _key(self, key: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(key, _SCALAR_KEY_TYPES) or (
            type(key) is tuple and all(isinstance(k, _SCALAR_KEY_TYPES) for k in key)
        ):
            return self.encode(key, path)
        raise _unsupported(
            path, f"a dict key of type {type(key).__qualname__}", "use str or int keys"
        )

    def _tensor(self, t: torch.Tensor, path: tuple[Any, ...]) -> dict[str, Any]:
        if type(t) not in (torch.Tensor, torch.nn.Parameter):
            raise _unsupported(
                path,
                f"a tensor subclass {type(t).__qualname__}",
                "convert it to a plain tensor (DTensor: .full_tensor(); or torch.Tensor(t))",
            )
        if t.layout != torch.strided:
            raise _unsupported(
                path,
                f"a {t.layout} tensor",
                "make it dense with .to_dense(), but be aware this may make a much larger file",
            )
        if t.is_quantized:
            raise _unsupported(
                path, "a quantized tensor", "dequantize it, or save to a .pt path (torch format)"
            )
        if t.dtype not in VIEWABLE_DTYPES:  # what the reader would refuse to build
            raise _unsupported(path, f"a tensor of dtype {t.dtype}", "convert it with .to()")
        if t.device.type == "meta":
            raise _unsupported(path, "a meta tensor (it has no data)", "materialize it first")
        node: dict[str, Any] = {"$": "tensor"}
        if isinstance(t, torch.nn.Parameter):
            node["param"] = True
            node["rg"] = t.requires_grad
        elif t.requires_grad:
            node["rg"] = True
        if t.is_conj() or t.is_neg():
            # A lazy conjugate/negative view reads the base's bytes differently: store its values.
            t = t.detach().resolve_conj().resolve_neg()
        if t.device.type != "cpu":
            node["dev"] = str(t.device)
        self.leaves.append((node, t, ".".join(str(p) for p in path) or "tensor"))
        return node

    def _ndarray(self, a: np.ndarray[Any, Any], path: tuple[Any, ...]) -> dict[str, Any]:
        if type(a) is not np.ndarray:
            raise _unsupported(path, f"a numpy array subclass {type(a).__qualname__}", _NP_HINT)
        text = _np_dtype_text(a.dtype, path, "a numpy array of dtype")
        native = a.dtype.newbyteorder("=")
        extra: dict[str, Any] = {}
        if native.str[1:] in _TORCH_HAS:
            t = torch.from_numpy(np.array(a, dtype=native, copy=True, order="C"))
            if native != a.dtype:  # big-endian on a little-endian machine: values kept, order noted
                extra["dtype"] = text
        else:  # long double, byte and unicode strings: torch has no such dtype; keep the bytes
            raw = np.frombuffer(np.ascontiguousarray(a).tobytes(), dtype=np.uint8)
            t = torch.from_numpy(raw.copy())
            extra = {"dtype": text, "shape": list(a.shape), "raw": True}
        node = self._tensor(t, path)
        node["$"] = "ndarray"
        node.update(extra)
        return node

    def _np_scalar(self, value: np.generic[Any], path: tuple[Any, ...]) -> dict[str, Any]:
        text = _np_dtype_text(value.dtype, path, "a numpy scalar of dtype")
        if value.dtype.kind in "fc" and value.dtype.str[1:] not in _TORCH_HAS:
            # long double: .item() would round it to a float
            return {"$": "np", "dtype": text, "raw": base64.b64encode(value.tobytes()).decode()}
        return {"$": "np", "dtype": text, "v": self.encode(value.item(), path)}

    def assign_keys(self) -> dict[str, torch.Tensor]:
        """Give every stored tensor a unique key and record sharing in the skeleton nodes."""
        groups: dict[Any, list[int]] = {}
        for i, (_, t, _) in enumerate(self.leaves):
            storage = t.untyped_storage()
            ident = (str(t.device), storage.data_ptr()) if storage.nbytes() else ("empty", i)
            groups.setdefault(ident, []).append(i)
        used = set(_RESERVED_KEYS)
        table: dict[str, torch.Tensor] = {}

        def unique(proposed: str) -> str:
            key, n = proposed, 1
            while key in used:
                n += 1
                key = f"{proposed}#{n}"
            used.add(key)
            return key

        for g, members in enumerate(groups.values()):
            specs = [_view_spec(self.leaves[i][1]) for i in members]
            if len(set(specs)) == 1:
                key = unique(self.leaves[members[0]][2])
                table[key] = self.leaves[members[0]][1]
                for i in members:
                    self.leaves[i][0]["k"] = key
                continue
            lo = min(s[0] for s in specs)
            hi = max(s[0] + _extent_bytes(s) for s in specs)
            base_index = next(
                (
                    i
                    for i, s in zip(members, specs, strict=True)
                    if self.leaves[i][1].is_contiguous()
                    and s[0] == lo
                    and lo % 16 == 0  # keeps every view aligned for its dtype on reload
                    and _extent_bytes(s) == hi - lo
                ),
                None,
            )
            if base_index is not None:
                base_spec = _view_spec(self.leaves[base_index][1])
                key = unique(self.leaves[base_index][2])
                table[key] = self.leaves[base_index][1]
            else:
                t0 = self.leaves[members[0]][1]
                lo -= lo % 16
                base_spec = (lo, (hi - lo,), (1,), torch.uint8)
                key = unique(f"__shared_storage__.{g}")
                table[key] = torch.empty(0, dtype=torch.uint8, device=t0.device).set_(
                    t0.untyped_storage(), lo, (hi - lo,), (1,)
                )
            for i, spec in zip(members, specs, strict=True):
                node = self.leaves[i][0]
                node["k"] = key
                if spec != base_spec:
                    node["view"] = {
                        "offset": spec[0] - lo,
                        "shape": list(spec[1]),
                        "stride": list(spec[2]),
                        "dtype": dtype_name(spec[3]),
                    }
        return table


def _np_dtype_text(dtype: np.dtype[Any], path: tuple[Any, ...], what: str) -> str:
    try:
        return numpy_dtype(dtype.str).str
    except ValueError:
        raise _unsupported(path, f"{what} {dtype}", _NP_HINT) from None


def _view_spec(t: torch.Tensor) -> tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype]:
    return (int(t.storage_offset()) * t.element_size(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _extent_bytes(spec: tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype]) -> int:
    """Bytes from a view's first element to just past its last one."""
    _, shape, stride, dtype = spec
    if any(s == 0 for s in shape):
        return 0
    last = sum((s - 1) * st for s, st in zip(shape, stride, strict=True))
    return (last + 1) * dtype.itemsize


def flatten(obj: Any) -> Flattened:
    """Split ``obj`` into a JSON skeleton and a table of the tensors to store.

    Raises:
        UnsupportedValueError: ``obj`` holds a value that cannot be stored without pickle.
    """
    flattener = _Flattener()
    skeleton = flattener.encode(obj, ())
    return Flattened(skeleton=skeleton, tensors=flattener.assign_keys())


def tensor_nodes(skeleton: Any) -> list[dict[str, Any]]:
    """Every tensor node of a skeleton, in tree order, each with its dotted path under ``"path"``."""
    found: list[dict[str, Any]] = []

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if not isinstance(node, dict):
            return
        tag = node.get("$")
        if tag in ("tensor", "ndarray"):
            found.append({**node, "path": ".".join(path) or "tensor"})
        elif tag == "dict" and isinstance(node.get("v"), dict):
            for k, v in node["v"].items():
                walk(v, (*path, str(k)))
        elif tag == "dict" and isinstance(node.get("items"), list):
            for item in node["items"]:
                if isinstance(item, list) and len(item) == 2:
                    walk(item[1], (*path, str(item[0])))
        elif tag in ("list", "tuple", "set", "frozenset") and isinstance(node.get("v"), list):
            for i, v in enumerate(node["v"]):
                walk(v, (*path, str(i)))

    walk(skeleton, ())
    return found
