"""Flattening a nested state into a tensor table plus a JSON skeleton, and back, in memory."""

from __future__ import annotations

import json
import pathlib
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn
from torch.torch_version import TorchVersion

from torchkeep import CorruptCheckpointError, UnsupportedValueError
from torchkeep.format import flatten, unflatten
from torchkeep.format._skeleton import MAX_DEPTH, tensor_nodes

from ..models import MLP, Opaque, TiedLM, assert_same, fill_


def rebuild(obj: Any) -> Any:
    """flatten -> JSON text -> unflatten, with tensors looked up in the table (views applied)."""
    flat = flatten(obj)
    skeleton = json.loads(json.dumps(flat.skeleton, allow_nan=False))
    table = flat.tensors

    def tensor(node: dict[str, Any]) -> torch.Tensor:
        base = table[node["k"]].detach().contiguous()
        view = node.get("view")
        if view is None:
            return base
        dtype = getattr(torch, view["dtype"])
        start = base.storage_offset() * base.element_size() + view["offset"]
        return torch.empty(0, dtype=dtype).set_(
            base.untyped_storage(), start // dtype.itemsize, view["shape"], view["stride"]
        )

    return unflatten(skeleton, tensor)


def test_plain_state_dict_keeps_its_keys() -> None:
    sd = fill_(MLP(), 0).state_dict()
    flat = flatten(sd)
    assert list(flat.tensors) == list(sd)
    for k, v in sd.items():
        assert flat.tensors[k] is v
    json.dumps(flat.skeleton, allow_nan=False)  # plain JSON


def test_nested_keys_are_dotted_paths() -> None:
    obj = {"model": {"fc": {"w": torch.ones(1)}}, "hist": [torch.zeros(1), (torch.ones(2),)]}
    assert set(flatten(obj).tensors) == {"model.fc.w", "hist.0", "hist.1.0"}


def test_a_bare_tensor_gets_a_key() -> None:
    t = torch.arange(3)
    flat = flatten(t)
    assert list(flat.tensors.values())[0] is t
    assert torch.equal(rebuild(t), t)


def test_colliding_dotted_keys_stay_distinct() -> None:
    obj = {"a.b": torch.ones(1), "a": {"b": torch.zeros(1)}, "__metadata__": torch.full((1,), 2.0)}
    flat = flatten(obj)
    assert len(flat.tensors) == 3
    assert "__metadata__" not in flat.tensors  # reserved by safetensors
    out = rebuild(obj)
    assert torch.equal(out["a.b"], torch.ones(1))
    assert torch.equal(out["a"]["b"], torch.zeros(1))
    assert torch.equal(out["__metadata__"], torch.full((1,), 2.0))


def test_tied_tensors_are_stored_once() -> None:
    sd = TiedLM().state_dict()
    flat = flatten(sd)
    assert len(flat.tensors) == 1
    nodes = {n["path"]: n for n in tensor_nodes(flat.skeleton)}
    assert nodes["emb.weight"]["k"] == nodes["out.weight"]["k"]
    out = rebuild(sd)
    assert torch.equal(out["emb.weight"], sd["emb.weight"])
    assert out["emb.weight"].data_ptr() == out["out.weight"].data_ptr()


def test_views_of_one_storage_are_stored_once_with_view_specs() -> None:
    w = torch.randn(4, 6)
    flat = flatten({"w": w, "wt": w.t(), "row": w[2], "bits": w.view(torch.int32)})
    assert len(flat.tensors) == 1
    out = rebuild({"w": w, "wt": w.t(), "row": w[2], "bits": w.view(torch.int32)})
    assert torch.equal(out["wt"], w.t()) and out["wt"].stride() == (1, 6)
    assert torch.equal(out["row"], w[2]) and torch.equal(out["bits"], w.view(torch.int32))
    out["w"][2, 3] = 99.0
    assert out["wt"][3, 2] == 99.0 and out["row"][3] == 99.0


def test_partial_views_store_only_the_range_they_cover() -> None:
    base = torch.arange(10_000, dtype=torch.float32)
    obj = {"a": base[100:200], "b": base[150:300]}
    flat = flatten(obj)
    stored = sum(t.numel() * t.element_size() for t in flat.tensors.values())
    assert stored < 1000  # not the 40 kB base
    out = rebuild(obj)
    assert torch.equal(out["a"], base[100:200]) and torch.equal(out["b"], base[150:300])


def test_a_single_view_is_stored_as_itself() -> None:
    big = torch.randn(1000)
    flat = flatten({"slice": big[10:20]})
    (stored,) = flat.tensors.values()
    assert stored.numel() == 10


def test_containers_and_scalars_keep_their_types() -> None:
    od: OrderedDict[str, Any] = OrderedDict(b=1, a=2)
    od._metadata = {"": {"version": 2}}  # type: ignore[attr-defined]
    obj = {
        "od": od,
        "set": {3, 1, 2},
        "frozen": frozenset({"x"}),
        "tuple_key": {(1, "a"): "v", 2.5: None, None: 1, True: "t"},
        "bytes": b"\x00\xff",
        "complex": 1 + 2j,
        "np_scalar": np.float32(1.5),
        "np_int": np.int64(-3),
        "ndarray": np.arange(6, dtype=np.int16).reshape(2, 3),
        "big": 2**100,
        "neg_zero": -0.0,
        "inf": float("-inf"),
        "nan": float("nan"),
    }
    out = rebuild(obj)
    assert_same(obj, out)
    assert out["od"]._metadata == {"": {"version": 2}}
    assert type(out["np_scalar"]) is np.float32


def test_user_dicts_that_look_like_nodes_are_data() -> None:
    obj = {"$": "tensor", "k": "w", "view": {"offset": 0}}
    assert rebuild(obj) == obj
    obj2 = {"x": {"$": "bytes", "v": "AAAA"}}
    assert rebuild(obj2) == obj2


def test_parameters_and_requires_grad_are_recorded() -> None:
    obj = {"p": nn.Parameter(torch.ones(2)), "frozen": nn.Parameter(torch.ones(1), False)}
    nodes = {n["path"]: n for n in tensor_nodes(flatten(obj).skeleton)}
    assert nodes["p"]["param"] is True and nodes["p"]["rg"] is True
    assert nodes["frozen"]["rg"] is False


UNSUPPORTED = {
    "object": lambda: Opaque(),
    "lambda": lambda: lambda: 1,
    "coo": lambda: torch.randn(2, 2).to_sparse(),
    "csr": lambda: torch.randn(4, 4).to_sparse_csr(),
    "meta": lambda: torch.empty(2, device="meta"),
    "quantized": lambda: torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.quint8),
    "np-object": lambda: np.array(["a"], dtype=object),
    "module": lambda: nn.Linear(1, 1),
    "iterator": lambda: iter([1]),
    "range": lambda: range(3),
}


@pytest.mark.parametrize("kind", list(UNSUPPORTED))
@pytest.mark.filterwarnings("ignore:.*quantize_per_tensor.*:UserWarning")
@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta:UserWarning")
def test_unsupported_values_name_their_place(kind: str) -> None:
    with pytest.raises(UnsupportedValueError) as info:
        flatten({"model": {"layers": [0, UNSUPPORTED[kind]()]}})
    assert info.value.key == "obj['model']['layers'][1]"
    assert "obj['model']['layers'][1]" in str(info.value)
    assert info.value.hint


def test_tensor_subclass_is_refused() -> None:
    class Sub(torch.Tensor):
        pass

    with pytest.raises(UnsupportedValueError, match="subclass"):
        flatten({"t": torch.ones(2).as_subclass(Sub)})


def test_unsupported_dict_key() -> None:
    with pytest.raises(UnsupportedValueError) as info:
        flatten({"d": {Opaque(): 1}})
    assert "obj['d']" in str(info.value)


def test_cycles_and_excessive_depth_are_refused() -> None:
    loop: list[Any] = [1]
    loop.append(loop)
    with pytest.raises(UnsupportedValueError, match="contains itself"):
        flatten({"loop": loop})
    deep: Any = torch.ones(1)
    for _ in range(MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(UnsupportedValueError):
        flatten(deep)


def test_shared_subtrees_that_are_not_cycles_are_fine() -> None:
    shared = {"lr": 0.1}
    out = rebuild({"a": shared, "b": [shared, shared]})
    assert out == {"a": {"lr": 0.1}, "b": [{"lr": 0.1}, {"lr": 0.1}]}


def _decode(skeleton: Any) -> Any:
    return unflatten(skeleton, lambda node: torch.zeros(1), source="file.safetensors")


@pytest.mark.parametrize(
    "skeleton",
    [
        [1, 2],
        {"no": "tag"},
        {"$": "alien", "v": 1},
        {"$": "dict"},
        {"$": "dict", "items": [[1]]},
        {"$": "dict", "items": [[{"$": "list", "v": []}, 1]]},
        {"$": "list", "v": 3},
        {"$": "set", "v": [{"$": "list", "v": []}]},
        {"$": "bytes", "v": "not base64!"},
        {"$": "bytes", "v": 5},
        {"$": "float", "v": None},
        {"$": "float", "v": "abc"},
        {"$": "complex", "v": [1]},
        {"$": "complex", "v": 5},
        {"$": "dtype", "v": "float99"},
        {"$": "dtype", "v": 5},
        {"$": "dtype", "v": None},
        {"$": "device", "v": "toaster:0"},
        {"$": "device", "v": 3.5},
        {"$": "size", "v": "abc"},
        {"$": "size", "v": [[1]]},
        {"$": "np", "dtype": "not a dtype", "v": 1},
        {"$": "np"},
        {"$": "np", "dtype": "|O", "v": 1},
        {"$": "np", "dtype": "<f8", "raw": "AAAA"},
        {"$": "np_dtype", "v": "|O"},
        {"$": "np_dtype", "v": [("a", "<i4")]},
        {"$": "np_dtype", "v": "<M8[ns]"},
        {"$": "torch_version", "v": 5},
        {"$": "path", "v": 1, "flavour": "posix", "pure": True},
        {"$": "path", "v": "/x", "flavour": "mac", "pure": True},
        {"$": "path", "v": "/x", "flavour": "posix"},
        {"$": "ndarray", "k": "x", "dtype": "|O"},
        {"$": "ndarray", "k": "x", "dtype": "<U2", "raw": True, "shape": [5]},
        {"$": "ndarray", "k": "x", "dtype": "<U2", "raw": True, "shape": "5"},
    ],
    ids=lambda s: json.dumps(s),
)
def test_hostile_skeletons_are_corrupt(skeleton: Any) -> None:
    with pytest.raises(CorruptCheckpointError) as info:
        _decode({"$": "dict", "v": {"x": skeleton}})
    assert "file.safetensors" in str(info.value)


def test_deep_skeletons_are_corrupt_not_recursion_errors() -> None:
    node: Any = 1
    for _ in range(MAX_DEPTH + 10):
        node = {"$": "list", "v": [node]}
    with pytest.raises(CorruptCheckpointError):
        _decode(node)
    node = 1
    for _ in range(50_000):
        node = {"$": "list", "v": [node]}
    with pytest.raises(CorruptCheckpointError):
        _decode(node)


def test_tensor_nodes_walks_every_container() -> None:
    obj = {"a": [torch.ones(1), {"b": torch.ones(1)}], 3: (torch.ones(1),)}
    paths = sorted(n["path"] for n in tensor_nodes(flatten(obj).skeleton))
    assert paths == ["3.0", "a.0", "a.1.b"]


# ---- the harmless values of real checkpoints (tests/format/test_foreign_values.py) -----------

LONG_DOUBLE = np.dtype(np.longdouble).str
NP_DTYPES = ["|b1", "|i1", "<i2", ">i4", "<i8", "|u1", "<u2", "<u4", ">u8"]
NP_DTYPES += ["<f2", "<f4", ">f8", "<c8", "<c16", LONG_DOUBLE, "<U3", "|S4"]


def _np_scalar(dtype: str) -> st.SearchStrategy[Any]:
    return hnp.from_dtype(np.dtype(dtype)).map(lambda v: np.array(v, dtype=dtype)[()])


_path_text = st.text(alphabet="ab/._\\: ", max_size=12)
VALUES = st.one_of(
    st.sampled_from(NP_DTYPES).flatmap(
        lambda d: hnp.arrays(d, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
    ),
    st.sampled_from(NP_DTYPES).flatmap(_np_scalar),
    st.sampled_from(NP_DTYPES).map(np.dtype),
    st.text(max_size=20).map(TorchVersion),
    st.builds(pathlib.PurePosixPath, _path_text),
    st.builds(pathlib.PureWindowsPath, _path_text),
    st.builds(pathlib.Path, _path_text),
)


def same_value(expected: Any, actual: Any) -> None:
    assert type(actual) is type(expected)
    if isinstance(expected, np.ndarray):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape
        assert actual.tobytes() == expected.tobytes()
    elif isinstance(expected, np.generic):
        assert actual.dtype == expected.dtype
        assert np.array_equal(actual, expected, equal_nan=expected.dtype.kind in "fc")
    else:
        assert actual == expected and str(actual) == str(expected)


@given(st.lists(VALUES, max_size=4))
@example([pathlib.PureWindowsPath("//://")])  # its text parses back as another path
@settings(max_examples=150, deadline=None)
def test_harmless_values_round_trip_exactly(values: list[Any]) -> None:
    out = rebuild({"values": values, "nested": [tuple(values)]})
    for expected, actual in zip(values, out["values"], strict=True):
        same_value(expected, actual)
    for expected, actual in zip(values, out["nested"][0], strict=True):
        same_value(expected, actual)


def test_arrays_torch_has_are_stored_as_tensors_others_as_their_bytes() -> None:
    obj = {
        "u4": np.arange(3, dtype=np.uint32),
        "be": np.arange(3, dtype=">i4"),
        "ld": np.ones(2, dtype=np.longdouble),
        "text": np.array(["ab"]),
    }
    flat = flatten(obj)
    assert flat.tensors["u4"].dtype == torch.uint32
    assert flat.tensors["be"].dtype == torch.int32  # native order on disk, ">i4" noted
    assert flat.tensors["ld"].dtype == torch.uint8 and flat.tensors["ld"].numel() == 2 * (
        np.dtype(np.longdouble).itemsize
    )
    assert flat.tensors["text"].dtype == torch.uint8 and flat.tensors["text"].numel() == 8
    assert_same(obj, rebuild(obj))


@pytest.mark.parametrize(
    "value",
    [np.zeros(2, dtype=object), np.zeros(2, dtype=[("a", "<i4")]), np.dtype(object)]
    + [np.datetime64("2024-01-01"), np.zeros(1).view(np.recarray)],
    ids=["object-array", "structured", "object-dtype", "datetime", "recarray"],
)
def test_other_numpy_values_are_refused_with_their_place(value: Any) -> None:
    with pytest.raises(UnsupportedValueError) as info:
        flatten({"x": value})
    assert "obj['x']" in str(info.value)
