"""Nested states through a file and back: values, views, aliasing and sharing survive exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import torchkeep
from torchkeep import UnsupportedValueError

from ..helpers import SUFFIXES, random_tensor, roundtrip, shares_storage
from ..models import TiedLM, assert_same, same_bytes


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_zero_dim_and_empty_tensors(tmp_path: Path, suffix: str) -> None:
    obj = {
        "scalar": torch.tensor(3.5),
        "int_scalar": torch.tensor(-7, dtype=torch.int64),
        "empty": torch.empty(0),
        "empty3d": torch.empty(3, 0, 2, dtype=torch.float16),
        "empty_bool": torch.empty(0, dtype=torch.bool),
        "also_empty": torch.empty(0),
    }
    out = roundtrip(obj, tmp_path / f"x{suffix}")
    assert_same(obj, out)
    assert out["scalar"].item() == 3.5 and out["int_scalar"].item() == -7
    assert out["empty"] is not out["also_empty"] or suffix == ".pt"


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_non_contiguous_tensors(tmp_path: Path, suffix: str) -> None:
    base = torch.randn(6, 8)
    obj = {
        "transposed": torch.randn(5, 3).t(),
        "stepped": torch.randn(20)[::3],
        "expanded": torch.randn(3, 1).expand(3, 4),
        "permuted": torch.randn(2, 3, 4).permute(2, 0, 1),
        "column": base[:, 5],
        "complex_conj": torch.randn(4, dtype=torch.complex64).conj(),
        # one element, "contiguous" to torch, yet with a stride of 2
        "single_strided": torch.randn(2)[::2],
        "single_cell": torch.randn(1, 3, dtype=torch.float64)[:, 1::2],
    }
    out = roundtrip(obj, tmp_path / f"x{suffix}")
    for k, v in obj.items():
        assert out[k].shape == v.shape and out[k].dtype == v.dtype, k
        assert torch.equal(out[k], v), k


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_tied_weights_are_stored_once_and_stay_tied(tmp_path: Path, suffix: str) -> None:
    model = TiedLM(vocab=1000, dim=64)
    sd = model.state_dict()
    path = tmp_path / f"tied{suffix}"
    out = roundtrip(sd, path)
    weight_bytes = 1000 * 64 * 4
    assert path.stat().st_size < 1.5 * weight_bytes  # stored once
    assert torch.equal(out["emb.weight"], model.emb.weight)
    assert shares_storage(out["emb.weight"], out["out.weight"])
    if suffix == ".safetensors":
        assert out["emb.weight"] is out["out.weight"]
        info = torchkeep.inspect(path)
        assert info.shared == {"out.weight": "emb.weight"}
        assert info.total_bytes == weight_bytes


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_same_parameter_twice_comes_back_as_one_parameter(tmp_path: Path, suffix: str) -> None:
    p = nn.Parameter(torch.randn(3, 2))
    out = roundtrip({"a": p, "nested": {"b": p}, "list": [p]}, tmp_path / f"x{suffix}")
    assert isinstance(out["a"], nn.Parameter) and out["a"].requires_grad
    assert out["a"] is out["nested"]["b"] is out["list"][0]
    assert torch.equal(out["a"], p)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_views_of_one_storage_keep_their_aliasing(tmp_path: Path, suffix: str) -> None:
    w = torch.randn(256, 256)
    obj = {"w": w, "wt": w.t(), "row": w[1], "col": w[:, 2]}
    if suffix == ".safetensors":  # torch.save cannot store one storage under two dtypes
        obj["as_int"] = w.view(torch.int32)
    path = tmp_path / f"views{suffix}"
    out = roundtrip(obj, path)
    assert path.stat().st_size < 1.5 * w.numel() * 4  # one copy of the storage
    for k, v in obj.items():
        assert out[k].dtype == v.dtype and torch.equal(out[k], v), k
    assert out["wt"].stride() == (1, 256)
    out["w"][1, 2] = 1234.5  # writes through every view of the same storage
    assert out["wt"][2, 1] == 1234.5
    assert out["row"][2] == 1234.5 and out["col"][1] == 1234.5
    if suffix == ".safetensors":
        assert out["as_int"][1, 2] == torch.tensor(1234.5).view(torch.int32)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_conjugate_views_keep_their_conjugation(tmp_path: Path, suffix: str) -> None:
    z = torch.randn(4, dtype=torch.complex64)
    obj = {"z": z, "zc": z.conj()}
    out = roundtrip(obj, tmp_path / f"x{suffix}")
    assert torch.equal(out["z"], z)
    assert torch.equal(out["zc"], z.conj())


VIEW_DTYPES = [torch.float64, torch.float32, torch.int16, torch.uint8, torch.complex64]


@st.composite
def views_of_one_base(draw: Any) -> dict[str, torch.Tensor]:
    dtype = draw(st.sampled_from(VIEW_DTYPES))
    rows, cols = draw(st.integers(1, 5)), draw(st.integers(1, 6))
    base = random_tensor((rows, cols), dtype, seed=draw(st.integers(0, 999)))
    out: dict[str, torch.Tensor] = {}
    for i in range(draw(st.integers(1, 4))):
        v = base
        r0 = draw(st.integers(0, rows - 1))
        c0 = draw(st.integers(0, cols - 1))
        v = v[r0:, c0 :: draw(st.integers(1, 3))]
        if draw(st.booleans()):
            v = v.t()
        if draw(st.booleans()) and dtype.itemsize > 1 and v.stride(-1) == 1:
            v = v.view(torch.uint8)
        out[f"v{i}"] = v
    if draw(st.booleans()):
        out["base"] = base
    return out


@pytest.mark.parametrize("suffix", SUFFIXES)
@given(data=st.data())
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
def test_views_of_one_storage_round_trip(tmp_path: Path, suffix: str, data: Any) -> None:
    obj = data.draw(views_of_one_base(), label="views")
    dtypes = {v.dtype for v in obj.values()}
    if suffix == ".pt" and len(dtypes) > 1:
        return  # torch.save cannot store one storage under two dtypes (tested above)
    out = roundtrip(obj, tmp_path / f"v{suffix}")
    assert list(out) == list(obj)
    for k, v in obj.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape, k
        assert same_bytes(v, out[k]), k
    keys = [k for k, v in obj.items() if v.numel()]
    for a in keys:
        for b in keys:
            assert shares_storage(out[a], out[b]), (a, b)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_overlapping_slices_of_an_unsaved_buffer(tmp_path: Path, suffix: str) -> None:
    base = torch.arange(1000, dtype=torch.float32)
    obj = {"a": base[10:30], "b": base[20:50], "c": base[3:9:2]}
    out = roundtrip(obj, tmp_path / f"x{suffix}")
    for k, v in obj.items():
        assert torch.equal(out[k], v), k
    out["a"][15] = -1.0  # base[25]
    assert out["b"][5] == -1.0
    if suffix == ".safetensors":
        stored = safetensors.torch.load_file(str(tmp_path / f"x{suffix}"))
        assert sum(t.numel() * t.element_size() for t in stored.values()) < 1000 * 4 / 4


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_parameters_and_requires_grad(tmp_path: Path, suffix: str) -> None:
    obj = {
        "param": nn.Parameter(torch.randn(2, 2)),
        "frozen": nn.Parameter(torch.randn(2), requires_grad=False),
        "leaf": torch.randn(3, requires_grad=True),
        "plain": torch.randn(3),
    }
    out = roundtrip(obj, tmp_path / f"x{suffix}")
    assert_same(obj, out)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_odd_values_real_state_dicts_hold(tmp_path: Path, suffix: str) -> None:
    obj = {
        "size": torch.Size([2, 3]),
        "empty_size": torch.Size([]),
        "dtypes": [torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.complex64],
        "devices": (torch.device("cpu"), torch.device("cuda", 1), torch.device("meta")),
        "numbers": [0, -1, 2**70, 1.5, -0.0, float("inf"), float("-inf"), float("nan")],
        "flags": (True, False, None),
        "text": ["", "ünïcödé ✓", "a.b.c", "$"],
        "int_keys": {0: "a", 7: {"x": 1}},
        "nested_empty": {"l": [], "t": (), "d": {}},
        "tag_lookalike": {"$": "tensor", "k": "nothing", "v": 1},
    }
    out = roundtrip(obj, tmp_path / f"x{suffix}")
    assert_same(obj, out)


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize(
    "obj",
    [{}, [], (), torch.arange(4), 7, None, "text", [torch.ones(1), 2.5]],
    ids=["empty-dict", "empty-list", "empty-tuple", "tensor", "int", "none", "str", "list"],
)
def test_any_root_value(tmp_path: Path, suffix: str, obj: Any) -> None:
    assert_same(obj, roundtrip(obj, tmp_path / f"x{suffix}"))


@given(st.data())
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_lone_surrogates_in_keys_are_stored_or_refused(tmp_path_factory: Any, data: Any) -> None:
    key = data.draw(st.sampled_from(["\ud800", "a\udfffb"]))
    holder = data.draw(st.sampled_from(["tensor", "value"]))
    path = tmp_path_factory.mktemp("sur") / "x.safetensors"
    obj = {key: torch.ones(2)} if holder == "tensor" else {"k": key}
    try:
        torchkeep.save(obj, path)
    except UnsupportedValueError:
        assert not path.exists()  # refused before anything was written
        return
    assert_same(obj, torchkeep.load(path))


H_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.float8_e4m3fn,
]


@st.composite
def tensors(draw: Any) -> torch.Tensor:
    dtype = draw(st.sampled_from(H_DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    t = random_tensor(shape, dtype, seed=draw(st.integers(0, 2**16)))
    if t.dim() == 2 and draw(st.booleans()):
        t = t.t()
    return t


@st.composite
def states(draw: Any, dtype_views: bool = True) -> tuple[Any, list[torch.Tensor]]:
    """A nested structure whose tensors sometimes are views of a few shared bases."""
    bases = [random_tensor((4, 6), torch.float32, seed=i) for i in range(draw(st.integers(0, 2)))]
    views: list[torch.Tensor] = []
    for b in bases:
        views += [b, b.t(), b[1:3], b[:, ::2], b[2], b[1:, 2:5]]
        if dtype_views:
            views.append(b.view(torch.int32))
    leaf_tensors = tensors() if not views else st.one_of(tensors(), st.sampled_from(views))
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**80), 2**80),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=8),
        st.sampled_from(
            [torch.Size([2, 3]), torch.Size([]), torch.float16, torch.int8, torch.device("cpu")]
        ),
    )
    keys = st.text(alphabet="ab.$_ 0", max_size=4)
    tree = st.recursive(
        st.one_of(scalars, leaf_tensors),
        lambda children: st.one_of(
            st.lists(children, max_size=3),
            st.lists(children, max_size=3).map(tuple),
            st.dictionaries(keys, children, max_size=3),
            st.dictionaries(st.integers(-3, 3), children, max_size=3),
        ),
        max_leaves=12,
    )
    root = draw(st.dictionaries(keys, tree, max_size=4))
    return root, views


def _leaves(x: Any) -> list[Any]:
    if isinstance(x, dict):
        return [y for v in x.values() for y in _leaves(v)]
    if isinstance(x, list | tuple):
        return [y for v in x for y in _leaves(v)]
    return [x] if isinstance(x, torch.Tensor) else []


@pytest.mark.parametrize("suffix", SUFFIXES)
@given(data=st.data())
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
def test_save_load_is_the_identity(tmp_path: Path, suffix: str, data: Any) -> None:
    # torch.save cannot store one storage under two dtypes: see the test above
    obj, _ = data.draw(states(dtype_views=suffix == ".safetensors"), label="state")
    out = roundtrip(obj, tmp_path / f"h{suffix}")
    expected_leaves = _leaves(obj)
    assert_same(obj, out)
    got_leaves = _leaves(out)
    assert len(got_leaves) == len(expected_leaves)
    for e, g in zip(expected_leaves, got_leaves, strict=True):
        assert g.dtype == e.dtype and g.shape == e.shape
        assert same_bytes(e, g)
    # aliasing survives: tensors that shared memory still do, identical ones stay identical
    for i, a in enumerate(expected_leaves):
        for j, b in enumerate(expected_leaves[:i]):
            if a is b:
                assert got_leaves[i] is got_leaves[j]
            if a.numel() and b.numel() and shares_storage(a, b):
                assert shares_storage(got_leaves[i], got_leaves[j])
