"""Example inputs: their normal form, their names, dynamic dimensions, and other sizes to verify.

Inputs are ``(args, kwargs)`` as ``forward`` takes them, nested in tuples, lists and dicts as
the model likes; every tensor leaf is an input of the exported artifact. The batch dimension is
dimension 0 of every tensor whose dimension 0 has the size of the first tensor's.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from torchkeep._export._report import InputSpec
from torchkeep.errors import ExportError, InvalidArgumentError, UnsupportedValueError

__all__ = ["BATCH", "Inputs", "normalize"]

BATCH = "batch"


@dataclass(frozen=True)
class Inputs:
    """Positional and keyword arguments of ``forward``."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def leaves(self) -> list[Any]:
        return list(pytree.tree_leaves((self.args, self.kwargs)))

    def tensors(self) -> list[torch.Tensor]:
        return [x for x in self.leaves() if isinstance(x, torch.Tensor)]

    def map_tensors(self, fn: Any) -> Inputs:
        """Apply ``fn(index, tensor)`` to every tensor leaf, ``index`` counting tensors only."""
        count = iter(range(1 << 30))

        def visit(x: Any) -> Any:
            return fn(next(count), x) if isinstance(x, torch.Tensor) else x

        args, kwargs = pytree.tree_map(visit, (self.args, self.kwargs))
        return Inputs(tuple(args), dict(kwargs))


def normalize(example_inputs: Any) -> Inputs:
    """A tensor, a tuple/list of positional arguments, or a dict of keyword arguments."""
    if isinstance(example_inputs, torch.Tensor):
        inputs = Inputs((example_inputs,), {})
    elif isinstance(example_inputs, tuple | list):
        inputs = Inputs(tuple(example_inputs), {})
    elif isinstance(example_inputs, Mapping) and all(isinstance(k, str) for k in example_inputs):
        inputs = Inputs((), dict(example_inputs))
    else:
        raise UnsupportedValueError(
            f"example inputs of type {type(example_inputs).__name__} are not supported",
            hint="pass a tensor, a tuple of positional arguments, or a dict of keyword arguments",
        )
    if not inputs.tensors():
        raise UnsupportedValueError(
            "the example inputs hold no tensor", hint="pass at least one example tensor"
        )
    for t in inputs.tensors():
        if t.is_sparse or t.layout != torch.strided:
            raise UnsupportedValueError(
                f"example input of layout {t.layout} is not supported by the exporters",
                hint="pass dense tensors",
            )
    return inputs


def input_names(model: nn.Module, inputs: Inputs) -> list[str]:
    """One name per tensor leaf: the ``forward`` parameter, ``name_i``/``name_key`` when nested."""
    try:
        params = [
            p.name
            for p in inspect.signature(model.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        params = []
    names: list[str] = []
    for path, leaf in pytree.tree_flatten_with_path((inputs.args, inputs.kwargs))[0]:
        if not isinstance(leaf, torch.Tensor):
            continue
        kind, first, *rest = path
        if kind.idx == 0:  # type: ignore[attr-defined]  # pytree typing: a SequenceKey into (args, kwargs)
            i = first.idx  # type: ignore[attr-defined]  # pytree typing: a SequenceKey into args
            base = params[i] if i < len(params) else f"input_{i}"
        else:
            base = str(first.key)  # type: ignore[attr-defined]  # pytree typing: a MappingKey into kwargs
        parts = [str(getattr(k, "idx", getattr(k, "key", k))) for k in rest]
        names.append("_".join([base, *parts]))
    return names


def batch_size(inputs: Inputs) -> int | None:
    first = next((t for t in inputs.tensors() if t.dim() > 0), None)
    return None if first is None else int(first.shape[0])


def is_batched(t: torch.Tensor, size: int | None) -> bool:
    return size is not None and t.dim() > 0 and t.shape[0] == size


def dynamic_dims(
    inputs: Inputs,
    names: list[str],
    *,
    dynamic_batch: bool,
    user: Mapping[str | int, Mapping[int, str]] | None,
) -> list[dict[int, str]]:
    """Per tensor input, dimension -> symbolic name: the batch dimension plus the user's."""
    tensors = inputs.tensors()
    size = batch_size(inputs)
    dims: list[dict[int, str]] = [
        {0: BATCH} if dynamic_batch and is_batched(t, size) else {} for t in tensors
    ]
    for key, spec in (user or {}).items():
        if isinstance(key, int) and not isinstance(key, bool):
            index = key if 0 <= key < len(tensors) else None
        else:
            index = names.index(key) if key in names else None
        if index is None:
            raise InvalidArgumentError(
                f"dynamic_dims names input {key!r}, which is not one of the tensor inputs {names}",
                key=str(key),
                hint="key dynamic_dims by input name or by position among the tensor inputs",
            )
        for dim, name in spec.items():
            ndim = tensors[index].dim()
            if not -ndim <= dim < ndim or not str(name).isidentifier():
                raise InvalidArgumentError(
                    f"dynamic_dims[{key!r}] = {{{dim}: {name!r}}} does not fit an input of "
                    f"shape {tuple(tensors[index].shape)}",
                    key=str(key),
                    hint="give a dimension index within the input's rank and a name that is "
                    "a Python identifier",
                )
            dims[index][dim % ndim] = str(name)
    return dims


def specs(inputs: Inputs, names: list[str], dims: list[dict[int, str]]) -> list[InputSpec]:
    return [
        InputSpec(
            name, tuple(t.shape), str(t.dtype).removeprefix("torch."), dict(sorted(d.items()))
        )
        for name, t, d in zip(names, inputs.tensors(), dims, strict=True)
    ]


def _tile(t: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """``t`` resized to ``n`` along ``dim`` by repeating its slices: values stay in the domain
    the model expects (token ids, masks, images)."""
    index = torch.arange(n, device=t.device) % t.shape[dim]
    return t.index_select(dim, index).contiguous()


def resized(inputs: Inputs, dims: list[dict[int, str]], sizes: Mapping[str, int]) -> Inputs:
    """The inputs with every dimension named in ``sizes`` tiled to that size."""

    def resize(i: int, t: torch.Tensor) -> torch.Tensor:
        for dim, name in dims[i].items():
            if name in sizes and t.shape[dim] != sizes[name]:
                t = _tile(t, dim, sizes[name])
        return t

    return inputs.map_tensors(resize)


def sizes_of(inputs: Inputs, dims: list[dict[int, str]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for t, d in zip(inputs.tensors(), dims, strict=True):
        for dim, name in d.items():
            out.setdefault(name, int(t.shape[dim]))
    return out


def cases(
    inputs: Inputs, dims: list[dict[int, str]], batch_sizes: list[int] | None
) -> list[tuple[str, Inputs]]:
    """The example, then the sizes that show the dynamic dimensions are really dynamic."""
    example = sizes_of(inputs, dims)
    label = ", ".join(f"{k} {v}" for k, v in example.items())
    out = [(f"example ({label})" if label else "example", inputs)]
    if BATCH in example:
        for n in batch_sizes if batch_sizes is not None else [1, example[BATCH] + 1]:
            if n != example[BATCH]:
                out.append((f"batch {n}", resized(inputs, dims, {BATCH: n})))
    others = {k: v + 1 for k, v in example.items() if k != BATCH}
    if others:
        label = ", ".join(f"{k} {v}" for k, v in others.items())
        out.append((label, resized(inputs, dims, others)))
    return out


def torch_dynamic_shapes(
    model: nn.Module, inputs: Inputs, dims: list[dict[int, str]]
) -> tuple[Any, ...] | dict[str, Any] | None:
    """``dynamic_shapes`` for ``torch.export.export``: the structure of the inputs with one
    ``{dim: Dim}`` per tensor; a name used twice is one shared ``Dim``."""
    if not any(dims):
        return None
    shared: dict[str, Any] = {}

    def dim(name: str) -> Any:
        # min=1: with the default the range starts at 2 and batch 1 would be refused.
        return shared.setdefault(name, torch.export.Dim(name, min=1))

    per_tensor = iter(dims)

    def spec(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return None
        d = next(per_tensor)
        return {i: dim(n) for i, n in d.items()} or None

    args, kwargs = pytree.tree_map(spec, (inputs.args, inputs.kwargs))
    try:  # by parameter name, so that *args and keyword arguments line up with forward's
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except (TypeError, ValueError) as exc:
        if kwargs:
            raise ExportError(
                f"the example inputs do not fit {type(model).__name__}.forward: {exc}",
                hint="pass the arguments forward() takes",
            ) from exc
        return tuple(args)
    return dict(bound.arguments)


def ensure_batch(inputs: Inputs, minimum: int = 2) -> Inputs:
    """Inputs with a batch of at least ``minimum``: torch.export specializes a batch of 1."""
    size = batch_size(inputs)
    if size is None or size >= minimum:
        return inputs
    return inputs.map_tensors(lambda _, t: _tile(t, 0, minimum) if is_batched(t, size) else t)
