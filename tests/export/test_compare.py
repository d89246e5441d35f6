"""Output comparison (assert_close semantics) and the input helpers, property-tested."""

from __future__ import annotations

import math

import pytest
import torch
import typer
from hypothesis import given, settings
from hypothesis import strategies as st

from torchkeep._export._compare import compare, flat_outputs, tolerance
from torchkeep._export._inputs import Inputs, cases, dynamic_dims, ensure_batch, input_names
from torchkeep.cli._export_inputs import parse_dynamic_dims, parse_shape

finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(st.lists(finite, min_size=1, max_size=20), st.floats(0, 1e3, width=32))
def test_errors_are_the_largest_difference(values: list[float], shift: float) -> None:
    want = torch.tensor(values)
    got = want + shift
    check = compare("case", "out", want, got, None, None)
    diff = (got.double() - want.double()).abs()  # computed exactly, as compare does
    assert check.max_abs_error == pytest.approx(float(diff.max()), abs=1e-9)
    rtol, atol = tolerance(torch.float32, None, None)
    assert check.ok == bool((diff <= atol + rtol * want.double().abs()).all())
    assert compare("case", "out", want, want.clone(), None, None).max_abs_error == 0.0


def test_nans_infinities_shapes_and_dtypes() -> None:
    x = torch.tensor([1.0, math.nan, math.inf, -math.inf])
    assert compare("c", "o", x, x.clone(), None, None).ok
    y = x.clone()
    y[1] = 0.0
    assert compare("c", "o", x, y, None, None).problem == "NaNs in different places"
    assert not compare("c", "o", x, x[:3], None, None).ok
    assert "dtype" in (compare("c", "o", x, x.double(), None, None).problem or "")
    ints = torch.tensor([1, 2, 3])
    assert tolerance(torch.int64, 0.5, 0.5) == (0.0, 0.0)  # integers compare exactly
    assert not compare("c", "o", ints, ints + 1, 1.0, 1.0).ok
    assert compare("c", "o", torch.zeros(0, 3), torch.zeros(0, 3), None, None).ok


def test_output_names_follow_the_structure() -> None:
    out = {"logits": torch.zeros(1), "aux": (torch.zeros(1), None, torch.zeros(1))}
    names = [name for name, _ in flat_outputs(out)]
    assert names == ["output['logits']", "output['aux'][0]", "output['aux'][2]"]
    assert [name for name, _ in flat_outputs(torch.zeros(1))] == ["output"]


def test_batch_variants_tile_rows_and_keep_other_inputs() -> None:
    ids = torch.arange(6).reshape(2, 3)
    table = torch.ones(5)  # not batched: dimension 0 differs from the batch
    inputs = ensure_batch(Inputs((ids[:1], table), {}))
    assert inputs.args[0].shape == (2, 3) and torch.equal(inputs.args[0][1], ids[0])
    dims = dynamic_dims(inputs, ["ids", "table"], dynamic_batch=True, user={"ids": {1: "seq"}})
    assert dims == [{0: "batch", 1: "seq"}, {}]
    labels = [label for label, _ in cases(inputs, dims, None)]
    assert labels == ["example (batch 2, seq 3)", "batch 1", "batch 3", "seq 4"]
    _, grown = cases(inputs, dims, None)[-1]
    assert grown.args[0].shape == (2, 4) and torch.equal(grown.args[0][:, 3], grown.args[0][:, 0])
    assert grown.args[1] is table


def test_input_names_come_from_forward() -> None:
    class Net(torch.nn.Module):
        def forward(self, pixels: torch.Tensor, extra: dict[str, torch.Tensor]) -> torch.Tensor:
            return pixels

    inputs = Inputs((torch.zeros(1), {"a": torch.zeros(1), "b": torch.zeros(1)}), {})
    assert input_names(Net(), inputs) == ["pixels", "extra_a", "extra_b"]


@given(st.lists(st.integers(0, 10_000), min_size=1, max_size=6))
def test_shapes_round_trip(shape: list[int]) -> None:
    assert parse_shape(",".join(map(str, shape))) == tuple(shape)


@pytest.mark.parametrize("text", ["", "2,x", "2,,3", "-1,3", "2.5", "٣"])
def test_bad_shapes_are_usage_errors(text: str) -> None:
    with pytest.raises(typer.Exit) as info:
        parse_shape(text)
    assert info.value.exit_code == 2


@given(
    st.lists(
        st.tuples(
            st.one_of(st.integers(0, 9), st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True)),
            st.integers(-3, 5),
            st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True),
        ),
        max_size=5,
    )
)
def test_dynamic_dims_round_trip(items: list[tuple[int | str, int, str]]) -> None:
    expected: dict[int | str, dict[int, str]] = {}
    for key, dim, name in items:
        expected.setdefault(key, {})[dim] = name
    assert parse_dynamic_dims([f"{k}:{d}:{n}" for k, d, n in items]) == expected


def test_dtypes_shape_the_random_example_inputs() -> None:
    from torchkeep.cli._export_inputs import _dtypes, example_inputs

    dtypes = _dtypes(["int64", "bool", "float64"], 3)
    ids, mask, x = example_inputs([(2, 5), (2, 5), (2, 3)], dtypes)
    assert (ids.dtype, mask.dtype, x.dtype) == (torch.int64, torch.bool, torch.float64)
    assert set(ids.unique().tolist()) <= {0, 1}  # valid token ids and masks
    assert _dtypes(["fp16"], 2) == [torch.float16, torch.float16]
    again = example_inputs([(2, 5), (2, 5), (2, 3)], dtypes)[2]
    assert torch.equal(again, x)  # a fixed seed: the same example every run
