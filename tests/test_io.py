"""The public API end to end: save, load, inspect, load_into, save_model, load_model."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import torchkeep
from torchkeep import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    FormatVersionError,
    StorageError,
    TorchkeepError,
    UnsafeCheckpointError,
    UnsupportedValueError,
)
from torchkeep.format import _artifact, _torchfile

from .models import (
    MLP,
    BNNet,
    CapturedNet,
    Opaque,
    TiedLM,
    assert_same,
    fill_,
    rewrite_document,
    same_bytes,
)

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = [".safetensors", ".pt"]
ALL_DTYPES = sorted(
    {v for n in dir(torch) if isinstance(v := getattr(torch, n), torch.dtype)}, key=str
)
QUANTIZED = {torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4}
STORABLE_DTYPES = [d for d in ALL_DTYPES if d not in QUANTIZED]
# torch.save itself cannot write these "shell" sub-byte dtypes
SUB_BYTE = {getattr(torch, f"{p}int{i}") for p in ("", "u") for i in range(1, 8)}
NAMED_DTYPES = [
    torch.bfloat16,
    torch.float16,
    torch.float32,
    torch.float64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2fnuz,
    torch.float8_e8m0fnu,
    torch.bool,
    torch.complex32,
    torch.complex64,
    torch.complex128,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.uint16,
    torch.uint32,
    torch.uint64,
]
complex_half_ok = pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random bytes of any dtype (bool stays 0/1)."""
    g = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    if dtype is torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (numel * itemsize,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


def roundtrip(obj: Any, path: Path, **load_kwargs: Any) -> Any:
    torchkeep.save(obj, path)
    return torchkeep.load(path, **load_kwargs)


def shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def tutorial_checkpoint(seed: int = 0) -> tuple[dict[str, Any], nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = BNNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
    ckpt = {
        "epoch": 5,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": opt.state_dict(),
        "loss": 0.25,
        "loss_tensor": torch.tensor(0.25),
        "best": None,
        "finished": False,
        "name": "run-1 ✓",
        "hparams": {"lr": 1e-3, "betas": (0.9, 0.99), "layers": [4, 4]},
        "input_size": torch.Size([8, 4]),
        "dtype": torch.bfloat16,
        "device": torch.device("cpu"),
    }
    return ckpt, model, opt


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_state_dict_round_trip(tmp_path: Path, suffix: str) -> None:
    sd = fill_(BNNet(), 1).state_dict()
    out = roundtrip(sd, tmp_path / f"m{suffix}")
    assert_same(sd, out)
    assert isinstance(out, OrderedDict)
    # the per-module versions load_state_dict uses to upgrade old BatchNorm checkpoints
    assert getattr(out, "_metadata", None) == sd._metadata


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_tutorial_checkpoint_round_trip_resumes_training_exactly(
    tmp_path: Path, suffix: str
) -> None:
    ckpt, model, opt = tutorial_checkpoint()
    out = roundtrip(ckpt, tmp_path / f"ckpt{suffix}")
    assert_same(ckpt, out)
    assert out["optimizer_state_dict"]["state"].keys() == {0, 1, 2, 3}  # int keys kept

    model2 = BNNet()
    model2.load_state_dict(out["model_state_dict"])
    opt2 = torch.optim.Adam(model2.parameters())
    opt2.load_state_dict(out["optimizer_state_dict"])
    assert opt2.param_groups[0]["betas"] == (0.9, 0.99)
    x = torch.randn(8, 4)
    for m, o in ((model, opt), (model2, opt2)):
        torch.manual_seed(1)
        o.zero_grad()
        m(x).pow(2).mean().backward()
        o.step()
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".tar"])
def test_torch_suffixes_write_torch_zip_loadable_with_weights_only(
    tmp_path: Path, suffix: str
) -> None:
    ckpt, _, _ = tutorial_checkpoint()
    path = tmp_path / f"ckpt{suffix}"
    torchkeep.save(ckpt, path, metadata={"step": 3})
    assert path.read_bytes()[:4] == b"PK\x03\x04"
    plain = torch.load(path, weights_only=True)
    assert_same(ckpt, plain)
    assert torchkeep.inspect(path).metadata == {"step": 3}


def test_safetensors_suffix_writes_plain_safetensors(tmp_path: Path) -> None:
    ckpt, _, _ = tutorial_checkpoint()
    path = tmp_path / "ckpt.safetensors"
    torchkeep.save(ckpt, path, metadata={"note": "hi"})
    with safetensors.safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert "model_state_dict.fc.weight" in keys
    assert "optimizer_state_dict.state.0.exp_avg" in keys
    assert meta["format"] == "pt"
    assert "torchkeep" in meta and '"note"' in meta["torchkeep"]


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("dtype", NAMED_DTYPES, ids=str)
@complex_half_ok
def test_every_dtype_round_trips(tmp_path: Path, suffix: str, dtype: torch.dtype) -> None:
    obj = {
        "t": random_tensor((3, 5), dtype, seed=2),
        "scalar": random_tensor((), dtype, seed=3),
        "empty": random_tensor((0, 4), dtype),
        "strided": random_tensor((6, 4), dtype, seed=4)[::2, 1:],
    }
    out = roundtrip(obj, tmp_path / f"x{suffix}")
    expected = {k: v.contiguous() for k, v in obj.items()}
    assert_same(expected, out)


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("dtype", STORABLE_DTYPES, ids=str)
@complex_half_ok
def test_any_torch_dtype_round_trips_or_is_refused_cleanly(
    tmp_path: Path, suffix: str, dtype: torch.dtype
) -> None:
    obj = {"t": random_tensor((2, 3), dtype, seed=5)}
    path = tmp_path / f"x{suffix}"
    if suffix == ".pt" and dtype in SUB_BYTE:
        try:
            torchkeep.save(obj, path)
        except UnsupportedValueError as exc:
            assert str(dtype).removeprefix("torch.") in str(exc)
            assert not path.exists()
            return
    out = roundtrip(obj, path)
    assert out["t"].dtype == dtype
    assert same_bytes(obj["t"], out["t"])


@pytest.mark.parametrize("dtype", NAMED_DTYPES, ids=str)
@complex_half_ok
def test_every_dtype_readable_by_safetensors(tmp_path: Path, dtype: torch.dtype) -> None:
    t = random_tensor((4, 3), dtype, seed=6)
    path = tmp_path / "x.safetensors"
    torchkeep.save({"w": t}, path)
    plain = safetensors.torch.load_file(str(path))
    assert list(plain) == ["w"]
    # dtypes safetensors lacks are stored as their raw bytes
    if plain["w"].dtype == dtype:
        assert same_bytes(t, plain["w"])
    else:
        assert plain["w"].dtype == torch.uint8
        assert torch.equal(plain["w"].reshape(-1), t.reshape(-1).view(torch.uint8))


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


def test_one_storage_under_two_dtypes_in_torch_format_is_stored_or_refused(
    tmp_path: Path,
) -> None:
    w = torch.randn(4, 4)
    obj = {"w": w, "bits": w.view(torch.int32)}
    path = tmp_path / "x.pt"
    try:
        torchkeep.save(obj, path)
    except UnsupportedValueError as exc:
        assert "safetensors" in str(exc)  # the way out: a format that can hold it
        assert not path.exists()
        return
    out = torchkeep.load(path)
    assert torch.equal(out["w"], w) and torch.equal(out["bits"], obj["bits"])


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


def test_str_paths_and_uppercase_suffixes(tmp_path: Path) -> None:
    path = str(tmp_path / "Ünïcode dir" / "CKPT.PT")
    torchkeep.save({"w": torch.ones(2)}, path)
    assert Path(path).read_bytes()[:4] == b"PK\x03\x04"
    assert torch.equal(torchkeep.load(path)["w"], torch.ones(2))
    assert torchkeep.inspect(path).format == "torch-zip"


def test_saving_onto_a_directory_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(StorageError):
        torchkeep.save({"w": torch.ones(1)}, tmp_path / "d.safetensors")


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
        return
    assert_same(obj, torchkeep.load(path))


# --- hypothesis: save -> load is the identity -------------------------------------------------

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


# --- metadata, inspect, interop ---------------------------------------------------------------


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_metadata_round_trip_through_inspect(tmp_path: Path, suffix: str) -> None:
    meta = {"lr": 1e-3, "tags": ["a", "b"], "nested": {"ok": True, "n": None}, "ü": "✓"}
    path = tmp_path / f"x{suffix}"
    torchkeep.save({"w": torch.ones(2)}, path, metadata=meta)
    info = torchkeep.inspect(path)
    assert info.metadata == meta
    assert info.format == ("torchkeep" if suffix == ".safetensors" else "torch-zip")
    assert info.format_version == "1.0"
    assert [(t.name, t.dtype, t.shape) for t in info.tensors] == [("w", "float32", (2,))]


@pytest.mark.parametrize(
    "metadata", [{"x": float("nan")}, {"t": torch.ones(1)}, {"s": {1, 2}}, ["not", "a dict"]]
)
def test_metadata_must_be_json(tmp_path: Path, metadata: Any) -> None:
    path = tmp_path / "x.safetensors"
    with pytest.raises(UnsupportedValueError):
        torchkeep.save({"w": torch.ones(1)}, path, metadata=metadata)
    assert not path.exists()


def test_metadata_with_non_string_keys_is_refused_or_kept(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    meta = {1: "one", "two": 2}
    try:
        torchkeep.save({"w": torch.ones(1)}, path, metadata=meta)
    except UnsupportedValueError:
        return
    assert torchkeep.inspect(path).metadata == meta


def test_inspect_lists_nested_tensors_and_sharing(tmp_path: Path) -> None:
    w = torch.randn(4, 4)
    path = tmp_path / "x.safetensors"
    torchkeep.save({"model": {"w": w, "tied": w}, "opt": [torch.zeros(3)], "step": 1}, path)
    info = torchkeep.inspect(path)
    names = [t.name for t in info.tensors]
    assert sorted(names) == ["model.tied", "model.w", "opt.0"]
    assert info.shared == {"model.tied": "model.w"}
    assert info.total_bytes == 4 * 4 * 4 + 3 * 4
    assert info.num_params == 16 + 3
    assert info.file_bytes == path.stat().st_size


def test_plain_safetensors_files_load(tmp_path: Path) -> None:
    tensors = {"a.weight": torch.randn(3, 2), "b": torch.arange(5), "c": torch.ones(0)}
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt", "note": "x"})
    out = torchkeep.load(path)
    assert set(out) == set(tensors)
    for k, v in tensors.items():
        assert torch.equal(out[k], v)
    info = torchkeep.inspect(path)
    assert info.format == "safetensors" and info.metadata == {"note": "x"}


def test_torchkeep_files_load_with_safetensors_under_readable_keys(tmp_path: Path) -> None:
    sd = fill_(MLP(), 0).state_dict()
    path = tmp_path / "m.safetensors"
    torchkeep.save(sd, path)
    plain = safetensors.torch.load_file(str(path))
    assert set(plain) == set(sd)
    for k, v in sd.items():
        assert torch.equal(plain[k], v)

    nested = {"epoch": 3, "model_state_dict": sd, "history": [torch.ones(2)]}
    torchkeep.save(nested, path)
    plain = safetensors.torch.load_file(str(path))
    assert set(plain) == {f"model_state_dict.{k}" for k in sd} | {"history.0"}


@pytest.mark.parametrize(
    ("written", "renamed"),
    [
        (".safetensors", ".pt"),
        (".safetensors", ""),
        (".safetensors", ".bin"),
        (".pt", ".safetensors"),
        (".pt", ".json"),
    ],
)
def test_format_is_detected_from_bytes_not_suffix(
    tmp_path: Path, written: str, renamed: str
) -> None:
    obj = {"w": torch.randn(3), "step": 4}
    src = tmp_path / f"a{written}"
    torchkeep.save(obj, src)
    dst = tmp_path / f"b{renamed}"
    src.rename(dst)
    assert_same(obj, torchkeep.load(dst))
    assert torchkeep.inspect(dst).tensors[0].name == "w"


# --- map_location and dtype -------------------------------------------------------------------


def _write(kind: str, obj: Any, path: Path) -> Path:
    if kind == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    elif kind == "torch.save":
        torch.save(obj, path)
    else:
        torchkeep.save(obj, path)
    return path


KINDS = [
    ("torchkeep", ".safetensors"),
    ("torchkeep", ".pt"),
    ("torch.save", ".pt"),
    ("legacy", ".pt"),
]


@pytest.mark.parametrize(("kind", "suffix"), KINDS)
@pytest.mark.parametrize(
    "map_location", ["cpu", torch.device("cpu"), {"cpu": "cpu"}], ids=["str", "device", "dict"]
)
def test_map_location_forms(tmp_path: Path, kind: str, suffix: str, map_location: Any) -> None:
    obj = {"w": torch.randn(3, 2), "b": torch.arange(3), "w_t": None}
    obj["w_t"] = obj["w"].t()
    out = torchkeep.load(_write(kind, obj, tmp_path / f"x{suffix}"), map_location=map_location)
    for k in ("w", "b", "w_t"):
        assert out[k].device == torch.device("cpu") and torch.equal(out[k], obj[k])


@pytest.mark.parametrize(("kind", "suffix"), KINDS)
def test_map_location_callable(tmp_path: Path, kind: str, suffix: str) -> None:
    obj = {"w": torch.randn(3, 2), "b": torch.arange(3)}
    calls: list[str] = []

    def keep(storage: Any, loc: str) -> Any:
        calls.append(loc)
        return storage

    out = torchkeep.load(_write(kind, obj, tmp_path / f"x{suffix}"), map_location=keep)
    assert calls and set(calls) == {"cpu"}
    assert torch.equal(out["w"], obj["w"]) and torch.equal(out["b"], obj["b"])
    out2 = torchkeep.load(tmp_path / f"x{suffix}", map_location=lambda storage, loc: storage)
    assert torch.equal(out2["w"], obj["w"])


@pytest.mark.parametrize(("kind", "suffix"), KINDS)
def test_map_location_to_an_absent_device_is_a_torchkeep_error(
    tmp_path: Path, kind: str, suffix: str
) -> None:
    path = _write(kind, {"w": torch.randn(2)}, tmp_path / f"x{suffix}")
    with pytest.raises(torchkeep.InvalidArgumentError) as info:
        torchkeep.load(path, map_location="cuda:97")
    assert str(path) in str(info.value)


def test_map_location_moves_tensors_saved_on_another_device(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    torchkeep.save({"w": torch.randn(2, 2), "b": torch.ones(1)}, path)
    expected = torchkeep.load(path)["w"].clone()

    def saved_on_gpu(doc: dict[str, Any]) -> None:
        doc["skeleton"]["v"]["w"]["dev"] = "cuda:97"

    rewrite_document(path, saved_on_gpu)
    with pytest.raises(TorchkeepError):
        torchkeep.load(path)  # no such device here
    for ml in ("cpu", {"cuda:97": "cpu"}, torch.device("cpu")):
        out = torchkeep.load(path, map_location=ml)
        assert out["w"].device.type == "cpu" and torch.equal(out["w"], expected)
    seen: list[str] = []
    out = torchkeep.load(path, map_location=lambda s, loc: seen.append(loc) or s)
    assert "cuda:97" in seen and torch.equal(out["w"], expected)


@pytest.mark.parametrize(("kind", "suffix"), KINDS)
def test_dtype_casts_floating_tensors_only(tmp_path: Path, kind: str, suffix: str) -> None:
    obj = {
        "f32": torch.randn(3),
        "f64": torch.randn(3, dtype=torch.float64),
        "bf16": torch.randn(3).bfloat16(),
        "i64": torch.arange(3),
        "u8": torch.arange(3, dtype=torch.uint8),
        "flag": torch.tensor([True, False]),
        "c64": torch.randn(2, dtype=torch.complex64),
        "param": nn.Parameter(torch.randn(2)),
        "epoch": 3,
        "lr": 0.5,
    }
    out = torchkeep.load(_write(kind, obj, tmp_path / f"x{suffix}"), dtype=torch.float16)
    for k in ("f32", "f64", "bf16", "param"):
        assert out[k].dtype == torch.float16, k
        assert torch.equal(out[k], obj[k].detach().to(torch.float16)), k
    for k in ("i64", "u8", "flag", "c64"):
        assert out[k].dtype == obj[k].dtype and torch.equal(out[k], obj[k]), k
    assert isinstance(out["param"], nn.Parameter)
    assert out["epoch"] == 3 and type(out["epoch"]) is int and out["lr"] == 0.5


# --- memory: tensors stay mapped --------------------------------------------------------------

_RSS = """
import os, sys, gc
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
"""


def _run_py(code: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", _RSS + textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


MIB = 1024 * 1024


def test_load_keeps_tensors_mapped(tmp_path: Path) -> None:
    tensors = {f"layer{i}": torch.randn(2 * MIB) for i in range(8)}  # 8 x 8 MiB = 64 MiB
    path = tmp_path / "big.safetensors"
    torchkeep.save(tensors, path)
    small = tmp_path / "small.safetensors"
    torchkeep.save({"x": torch.ones(4)}, small)
    total = sum(float(t.double().sum()) for t in tensors.values())
    out = _run_py(
        """
        import torch, torchkeep
        torchkeep.load(sys.argv[2])  # warm up imports
        gc.collect()
        before = rss()
        obj = torchkeep.load(sys.argv[1])
        grown = rss() - before
        total = sum(float(t.double().sum()) for t in obj.values())
        print(grown, total)
        """,
        str(path),
        str(small),
    )
    grown, got = out.split()
    assert int(grown) < 0.5 * 64 * MIB, f"RSS grew by {int(grown) / MIB:.1f} MiB"
    assert math.isclose(float(got), total, rel_tol=1e-9, abs_tol=1e-6)


def test_load_into_keeps_peak_memory_near_one_copy(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(2048, 2048, bias=False) for _ in range(4)])  # 64 MiB
    path = tmp_path / "big.safetensors"
    torchkeep.save(model.state_dict(), path)
    small = tmp_path / "small.safetensors"
    torchkeep.save(nn.Linear(2, 2).state_dict(), small)
    sums = " ".join(repr(float(p.detach().double().sum())) for p in model.parameters())
    del model
    out = _run_py(
        """
        import torch, torchkeep
        from torch import nn
        torchkeep.load_into(nn.Linear(2, 2), sys.argv[2])  # warm up imports
        torch.manual_seed(1)
        model = nn.Sequential(*[nn.Linear(2048, 2048, bias=False) for _ in range(4)])
        gc.collect()
        before = rss()
        report = torchkeep.load_into(model, sys.argv[1])
        grown = rss() - before
        print(grown, len(report.loaded))
        print(" ".join(repr(float(p.detach().double().sum())) for p in model.parameters()))
        """,
        str(path),
        str(small),
    )
    first, second = out.strip().splitlines()
    grown, loaded = first.split()
    assert int(loaded) == 4
    assert int(grown) < 0.5 * 64 * MIB, f"RSS grew by {int(grown) / MIB:.1f} MiB"
    for want, got in zip(sums.split(), second.split(), strict=True):
        assert math.isclose(float(want), float(got), rel_tol=1e-9, abs_tol=1e-6)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_writing_to_loaded_tensors_never_changes_the_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"x{suffix}"
    w = torch.randn(64, 64)
    torchkeep.save({"w": w}, path)
    before = path.read_bytes()
    out = torchkeep.load(path)
    out["w"].add_(1.0)
    model = nn.Linear(64, 64, bias=False)
    torchkeep.load_into(model, {"weight": torchkeep.load(path)["w"]})
    with torch.no_grad():
        model.weight.mul_(3)
    assert path.read_bytes() == before
    assert torch.equal(torchkeep.load(path)["w"], w)


# --- atomicity --------------------------------------------------------------------------------


def _temporaries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tkp-" in p.name)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_crash_mid_save_leaves_previous_file_intact(
    tmp_path: Path, suffix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / f"ckpt{suffix}"
    old = {"w": torch.randn(1000), "step": 1}
    torchkeep.save(old, path)
    before = path.read_bytes()

    class Crash(Exception):
        pass

    if suffix == ".safetensors":
        real = _artifact.write_safetensors

        def half_then_crash(f: Any, tensors: Any, metadata: Any) -> None:
            import io

            buf = io.BytesIO()
            real(buf, tensors, metadata)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            raise Crash

        monkeypatch.setattr(_artifact, "write_safetensors", half_then_crash)
    else:
        real_save = torch.save

        def half_then_crash(obj: Any, f: Any, *a: Any, **k: Any) -> None:
            import io

            buf = io.BytesIO()
            real_save(obj, buf, *a, **k)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            raise Crash

        monkeypatch.setattr(_torchfile.torch, "save", half_then_crash)
    with pytest.raises(Crash):
        torchkeep.save({"w": torch.zeros(1000), "step": 2}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert_same(old, torchkeep.load(path))
    assert _temporaries(tmp_path) == []


def test_disk_error_mid_save_is_a_storage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    path = tmp_path / "ckpt.safetensors"
    torchkeep.save({"w": torch.ones(3)}, path)
    before = path.read_bytes()

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StorageError) as info:
        torchkeep.save({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert isinstance(info.value, OSError)
    assert "full" in str(info.value) and str(path) in str(info.value)
    assert path.read_bytes() == before and _temporaries(tmp_path) == []


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_sigkill_while_saving_keeps_last_complete_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"ckpt{suffix}"
    code = """
        import sys, torch, torchkeep
        k = 0
        while True:
            k += 1
            torchkeep.save({"step": k, "w": torch.full((4 * 1024 * 1024,), float(k))}, sys.argv[1])
            print(k, flush=True)
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "1"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # kill it while a temporary file is being written
            if any((tmp_path / n).stat().st_size > 0 for n in _temporaries(tmp_path)):
                break
            time.sleep(0.0005)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    out = torchkeep.load(path)
    k = out["step"]
    assert k >= 1 and out["w"].shape == (4 * 1024 * 1024,)
    assert out["w"].min() == out["w"].max() == float(k)

    torchkeep.save({"step": 0}, path)  # the next save sweeps what the dead writer left
    assert _temporaries(tmp_path) == []
    assert torchkeep.load(path) == {"step": 0}


# --- format versions --------------------------------------------------------------------------


def test_newer_major_format_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    torchkeep.save({"w": torch.ones(2)}, path)
    rewrite_document(path, lambda doc: doc.update(format_version="99.0"))
    for read in (torchkeep.load, torchkeep.inspect):
        with pytest.raises(FormatVersionError) as info:
            read(path)
        assert isinstance(info.value, CorruptCheckpointError)
        assert "99.0" in str(info.value) and str(path) in str(info.value)
        assert info.value.hint and "upgrade" in info.value.hint
    with pytest.raises(FormatVersionError):
        torchkeep.load_into(nn.Linear(2, 1), path)


def test_newer_minor_format_version_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    torchkeep.save({"w": torch.ones(2)}, path)
    rewrite_document(path, lambda doc: doc.update(format_version="1.7"))
    assert torch.equal(torchkeep.load(path)["w"], torch.ones(2))


@pytest.mark.parametrize("version", [None, 1, "", "x.0", "-1.0"])
def test_invalid_format_version_is_corrupt(tmp_path: Path, version: Any) -> None:
    path = tmp_path / "x.safetensors"
    torchkeep.save({"w": torch.ones(2)}, path)
    rewrite_document(path, lambda doc: doc.update(format_version=version))
    with pytest.raises(CorruptCheckpointError):
        torchkeep.load(path)


# --- bad input --------------------------------------------------------------------------------


def _assert_helpful(exc: TorchkeepError, path: Path) -> None:
    assert str(path) in str(exc)
    assert exc.hint


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.safetensors"
    for call in (torchkeep.load, torchkeep.inspect, torchkeep.load_model):
        with pytest.raises(CheckpointNotFoundError) as info:
            call(path)
        assert isinstance(info.value, FileNotFoundError)
        _assert_helpful(info.value, path)
    with pytest.raises(CheckpointNotFoundError):
        torchkeep.load_into(nn.Linear(1, 1), path)


def test_directory_without_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointNotFoundError) as info:
        torchkeep.load(tmp_path)
    _assert_helpful(info.value, tmp_path)


def test_directory_holding_model_safetensors_loads(tmp_path: Path) -> None:
    sd = fill_(MLP(), 3).state_dict()
    torchkeep.save(sd, tmp_path / "model.safetensors")
    assert_same(sd, torchkeep.load(tmp_path))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00",
        b"hello world, not a checkpoint",
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 64,
        b"PK\x03\x04" + b"\x00" * 60,
        b"\xff" * 100,
        b"{}",
        b'{"weight_map": 3}',
        b"\x80\x04K\x01.",  # a pickle of the int 1
    ],
)
def test_wrong_magic_bytes(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(data)
    for call in (torchkeep.load, torchkeep.inspect):
        with pytest.raises(CorruptCheckpointError) as info:
            call(path)
        _assert_helpful(info.value, path)


@pytest.mark.parametrize("suffix", SUFFIXES + [".legacy"])
@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.1, 0.3, 0.5, 0.9, 0.999])
def test_truncated_file(tmp_path: Path, suffix: str, fraction: float) -> None:
    path = tmp_path / f"x{suffix}"
    ckpt, _, _ = tutorial_checkpoint()
    if suffix == ".legacy":
        torch.save(ckpt, path, _use_new_zipfile_serialization=False)
    else:
        torchkeep.save(ckpt, path)
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * fraction))])
    for call in (torchkeep.load, torchkeep.inspect):
        with pytest.raises(CorruptCheckpointError) as info:
            call(path)
        _assert_helpful(info.value, path)
    with pytest.raises(CorruptCheckpointError):
        torchkeep.load_into(BNNet(), path)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_flipped_bytes_never_escape_as_foreign_errors(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"x{suffix}"
    ckpt, _, _ = tutorial_checkpoint()
    torchkeep.save(ckpt, path)
    data = path.read_bytes()
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        pos = int(torch.randint(0, min(len(data), 4096), (1,), generator=g))
        damaged = bytearray(data)
        damaged[pos] ^= 0xFF
        path.write_bytes(bytes(damaged))
        with contextlib.suppress(TorchkeepError):
            torchkeep.load(path)


def test_header_that_lies_about_sizes(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    torchkeep.save({"w": torch.ones(4)}, path)
    data = bytearray(path.read_bytes())
    data[:8] = (len(data) * 2).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError) as info:
        torchkeep.load(path)
    _assert_helpful(info.value, path)


# --- unsupported values -----------------------------------------------------------------------


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize(
    ("value", "what"),
    [
        (Opaque(), "Opaque"),
        (lambda x: x, "function"),
        (torch.randn(3, 3).to_sparse(), "sparse"),
        (object(), "object"),
        (nn.Linear(1, 1), "Linear"),
    ],
    ids=["object", "lambda", "sparse", "bare-object", "module"],
)
def test_unsupported_values_name_where_they_are(
    tmp_path: Path, suffix: str, value: Any, what: str
) -> None:
    path = tmp_path / f"x{suffix}"
    torchkeep.save({"ok": 1}, path)
    before = path.read_bytes()
    with pytest.raises(UnsupportedValueError) as info:
        torchkeep.save({"a": [1, {"b": value}], "w": torch.ones(1)}, path)
    assert "['a'][1]['b']" in str(info.value)
    assert what in str(info.value)
    assert path.read_bytes() == before and _temporaries(tmp_path) == []


# --- unsafe pickles ---------------------------------------------------------------------------


class _Boom:
    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.canary}",))


@pytest.mark.parametrize("legacy", [False, True])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, legacy: bool) -> None:
    canary = tmp_path / "canary"
    path = tmp_path / "evil.pt"
    torch.save(
        {"w": torch.ones(2), "x": _Boom(canary)},
        path,
        _use_new_zipfile_serialization=not legacy,
    )
    for call in (
        torchkeep.load,
        torchkeep.inspect,
        torchkeep.load_model,
        lambda p: torchkeep.load_into(nn.Linear(1, 1), p),
    ):
        with pytest.raises(UnsafeCheckpointError) as info:
            call(path)
        assert any("system" in g for g in info.value.globals) or "system" in str(info.value)
        assert "trust=True" in str(info.value)
    assert not canary.exists()


def test_full_model_pickle_needs_trust(tmp_path: Path) -> None:
    model = fill_(MLP(), 4).train()
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        torchkeep.load(path)
    assert "tests.models.MLP" in str(info.value)
    with pytest.raises(UnsafeCheckpointError):
        torchkeep.load_model(path)
    loaded = torchkeep.load(path, trust=True)
    assert isinstance(loaded, MLP)
    rebuilt = torchkeep.load_model(path, trust=True)
    assert isinstance(rebuilt, MLP) and not rebuilt.training
    x = torch.randn(5, 4)
    assert torch.equal(rebuilt(x), model.eval()(x))


# --- save_model / load_model ------------------------------------------------------------------


def test_save_model_load_model_end_to_end(tmp_path: Path) -> None:
    model = fill_(CapturedNet(4, hidden=7, act="tanh", widths=(1, 2)), 5)
    torchkeep.save_model(model, tmp_path / "net")
    rebuilt = torchkeep.load_model(tmp_path / "net")
    assert type(rebuilt) is CapturedNet and not rebuilt.training
    assert rebuilt.act == "tanh" and rebuilt.widths == (1, 2)
    x = torch.randn(3, 4)
    assert torch.equal(rebuilt(x), model.eval()(x))
    info = torchkeep.inspect(tmp_path / "net")
    assert info.format == "torchkeep-model"
    assert {t.name for t in info.tensors} == set(model.state_dict())


def test_load_model_eval_mode_matters(tmp_path: Path) -> None:
    model = fill_(BNNet(), 6)
    model.train()
    model(torch.randn(16, 4))  # moves the running stats
    torchkeep.save_model(model, tmp_path / "bn", config={"d": 4})
    rebuilt = torchkeep.load_model(tmp_path / "bn", map_location="cpu")
    assert all(not m.training for m in rebuilt.modules())
    x = torch.randn(5, 4)
    assert torch.equal(rebuilt(x), model.eval()(x))
    assert rebuilt.bn.num_batches_tracked.item() == 1


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_saving_a_module_names_state_dict_and_save_model(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"
    for obj in (MLP(), {"epoch": 1, "model": MLP()}):
        with pytest.raises(UnsupportedValueError) as caught:
            torchkeep.save(obj, path)
        err = caught.value
        assert "torch.nn.Module (MLP)" in err.message
        assert "model.state_dict()" in (err.hint or "") and "tk.save_model" in (err.hint or "")
        assert err.path == str(path) and str(path) in str(err)
        assert not path.exists()


def test_save_model_of_a_main_class_warns_and_says_how_to_fix(tmp_path: Path) -> None:
    # A class of the running script: `torchkeep_model.json` records `__main__:Net`, which any
    # other program (a server, a notebook) resolves to its own `__main__`.
    net = type("Net", (nn.Module,), {"__module__": "__main__"})
    with pytest.warns(UserWarning, match="defined in __main__") as caught:
        torchkeep.save_model(net(), tmp_path / "net", config={})
    text = str(caught[0].message)
    assert "only that same script can load" in text
    assert "move the class into a module" in text and str(tmp_path / "net") in text
    assert (tmp_path / "net" / "torchkeep_model.json").is_file()
