"""load_into: finding a module's state in a checkpoint, checking it, copying it in place."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep
from torchkeep import IncompatibleStateError, LoadReport, Mismatch, Tie
from torchkeep.state import find_state

from ..models import (
    MLP,
    BNNet,
    ExtraStateNet,
    NonPersistentBufferNet,
    TiedLM,
    TransposedWeight,
    TwoHeads,
    fill_,
)

SOURCES = ["dict", ".safetensors", ".pt"]


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_state(module: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    actual = module.state_dict()
    assert list(actual) == list(expected)
    for k, v in expected.items():
        assert actual[k].dtype == v.dtype and torch.equal(actual[k], v), k


def source_of(obj: Any, kind: str, tmp_path: Path) -> Any:
    if kind == "dict":
        return obj
    path = tmp_path / f"ckpt{kind}"
    torchkeep.save(obj, path)
    return path


@pytest.mark.parametrize("kind", SOURCES)
def test_loads_every_key_in_place(tmp_path: Path, kind: str) -> None:
    src = fill_(BNNet(), 1)
    src.bn.num_batches_tracked.fill_(17)
    expected = snapshot(src)
    dst = fill_(BNNet(), 2)
    params_before = {k: (id(p), p.data_ptr()) for k, p in dst.state_dict(keep_vars=True).items()}
    report = torchkeep.load_into(dst, source_of(src.state_dict(), kind, tmp_path))
    assert isinstance(report, LoadReport) and report.ok
    assert report.loaded == tuple(expected)
    assert report.missing == report.unexpected == report.mismatched == ()
    assert report.entry == ""
    assert report.source == (None if kind == "dict" else str(tmp_path / f"ckpt{kind}"))
    assert_state(dst, expected)
    assert dst.bn.num_batches_tracked.item() == 17
    # filled in place: the very same parameter objects and memory
    after = {k: (id(p), p.data_ptr()) for k, p in dst.state_dict(keep_vars=True).items()}
    assert after == params_before


@pytest.mark.parametrize("kind", SOURCES)
@pytest.mark.parametrize(
    "entry", ["model_state_dict", "state_dict", "model", "net", "weights_for_inference"]
)
def test_finds_the_model_entry_in_a_checkpoint_dict(tmp_path: Path, kind: str, entry: str) -> None:
    src = fill_(MLP(), 3)
    opt = torch.optim.Adam(src.parameters())
    src(torch.randn(2, 4)).sum().backward()
    opt.step()
    ckpt = {
        "epoch": 4,
        entry: src.state_dict(),
        "optimizer_state_dict": opt.state_dict(),
        "loss": 0.1,
    }
    dst = MLP()
    report = torchkeep.load_into(dst, source_of(ckpt, kind, tmp_path))
    assert report.entry == entry
    assert report.ok
    assert_state(dst, snapshot(src))


def test_prefers_the_entry_that_fits_the_module(tmp_path: Path) -> None:
    a, b = fill_(MLP(), 1), fill_(TwoHeads(), 2)
    path = tmp_path / "two.safetensors"
    torchkeep.save({"teacher": b.state_dict(), "student": {"model": a.state_dict()}}, path)
    dst = MLP()
    report = torchkeep.load_into(dst, path)
    assert report.entry == "student.model"
    assert_state(dst, snapshot(a))


def test_find_state_returns_top_level_for_a_plain_state_dict() -> None:
    sd = MLP().state_dict()
    state, entry = find_state(set(sd), sd)
    assert entry == "" and state is sd


def test_no_state_dict_in_the_checkpoint() -> None:
    with pytest.raises(IncompatibleStateError):
        torchkeep.load_into(MLP(), {"epoch": 3, "loss": 0.5})
    with pytest.raises(IncompatibleStateError):
        torchkeep.load_into(MLP(), {})


def test_a_checkpoint_that_is_not_a_dict(tmp_path: Path) -> None:
    path = tmp_path / "list.safetensors"
    torchkeep.save([torch.ones(1)], path)
    with pytest.raises(IncompatibleStateError):
        torchkeep.load_into(MLP(), path)


@pytest.mark.parametrize("kind", SOURCES)
def test_strict_refuses_missing_keys_and_touches_nothing(tmp_path: Path, kind: str) -> None:
    sd = fill_(MLP(), 1).state_dict()
    del sd["fc2.bias"]
    dst = fill_(MLP(), 2)
    before = snapshot(dst)
    with pytest.raises(IncompatibleStateError) as info:
        torchkeep.load_into(dst, source_of(sd, kind, tmp_path))
    assert_state(dst, before)
    text = str(info.value)
    assert "fc2.bias" in text and "missing" in text
    report = info.value.report
    assert isinstance(report, LoadReport) and report.missing == ("fc2.bias",)
    assert "strict=False" in (info.value.hint or "")


@pytest.mark.parametrize("kind", SOURCES)
def test_strict_refuses_unexpected_keys_and_touches_nothing(tmp_path: Path, kind: str) -> None:
    sd = fill_(MLP(), 1).state_dict()
    sd["fc3.weight"] = torch.ones(2, 2)
    dst = fill_(MLP(), 2)
    before = snapshot(dst)
    with pytest.raises(IncompatibleStateError, match="fc3.weight") as info:
        torchkeep.load_into(dst, source_of(sd, kind, tmp_path))
    assert info.value.report.unexpected == ("fc3.weight",)
    assert_state(dst, before)


@pytest.mark.parametrize("kind", SOURCES)
def test_non_strict_tolerates_missing_and_unexpected(tmp_path: Path, kind: str) -> None:
    src = fill_(MLP(), 1)
    sd = src.state_dict()
    del sd["fc2.bias"]
    sd["extra.weight"] = torch.ones(3)
    dst = fill_(MLP(), 2)
    kept_bias = dst.fc2.bias.detach().clone()
    report = torchkeep.load_into(dst, source_of(sd, kind, tmp_path), strict=False)
    assert report.missing == ("fc2.bias",)
    assert report.unexpected == ("extra.weight",)
    assert set(report.loaded) == {"fc1.weight", "fc1.bias", "fc2.weight"}
    assert not report.ok
    assert torch.equal(dst.fc2.bias, kept_bias)
    assert torch.equal(dst.fc1.weight, src.fc1.weight)


@pytest.mark.parametrize("kind", SOURCES)
@pytest.mark.parametrize("strict", [True, False])
def test_shape_mismatch_raises_with_a_table_and_touches_nothing(
    tmp_path: Path, kind: str, strict: bool
) -> None:
    src = fill_(TwoHeads(classes=10), 1)
    dst = fill_(TwoHeads(classes=3), 2)
    before = snapshot(dst)
    with pytest.raises(IncompatibleStateError) as info:
        torchkeep.load_into(dst, source_of(src.state_dict(), kind, tmp_path), strict=strict)
    assert_state(dst, before)  # not even the matching body was copied
    text = str(info.value)
    for needle in ("head.weight", "head.bias", "(3, 6)", "(10, 6)", "(3)", "(10)"):
        assert needle in text, needle
    table = info.value.report.table().splitlines()
    assert table[0].split()[0] == "key"
    assert any(line.split()[0] == "head.weight" and "(3, 6)" in line for line in table)
    assert info.value.report.mismatched == (
        Mismatch(key="head.weight", expected=(3, 6), found=(10, 6)),
        Mismatch(key="head.bias", expected=(3,), found=(10,)),
    )
    assert "skip_mismatched=True" in (info.value.hint or "")


@pytest.mark.parametrize("kind", SOURCES)
def test_skip_mismatched_keeps_those_parameters_and_loads_the_rest(
    tmp_path: Path, kind: str
) -> None:
    src = fill_(TwoHeads(classes=10), 1)
    dst = fill_(TwoHeads(classes=3), 2)
    head_w, head_b = dst.head.weight.detach().clone(), dst.head.bias.detach().clone()
    report = torchkeep.load_into(
        dst, source_of(src.state_dict(), kind, tmp_path), skip_mismatched=True
    )
    assert report.loaded == ("body.weight", "body.bias")
    assert [m.key for m in report.mismatched] == ["head.weight", "head.bias"]
    assert torch.equal(dst.body.weight, src.body.weight)
    assert torch.equal(dst.head.weight, head_w) and torch.equal(dst.head.bias, head_b)
    assert "head.weight" in str(report) and "(10, 6)" in str(report)


def test_skip_mismatched_with_strict_still_refuses_missing_keys() -> None:
    sd = fill_(TwoHeads(classes=10), 1).state_dict()
    del sd["body.bias"]
    dst = fill_(TwoHeads(classes=3), 2)
    before = snapshot(dst)
    with pytest.raises(IncompatibleStateError, match="body.bias"):
        torchkeep.load_into(dst, sd, skip_mismatched=True)
    assert_state(dst, before)


def test_non_tensor_value_for_a_tensor_key_is_a_mismatch() -> None:
    sd: dict[str, Any] = dict(fill_(MLP(), 1).state_dict())
    sd["fc1.bias"] = [1.0] * 8
    dst = fill_(MLP(), 2)
    before = snapshot(dst)
    with pytest.raises(IncompatibleStateError, match="fc1.bias"):
        torchkeep.load_into(dst, sd, strict=False)
    assert_state(dst, before)


@pytest.mark.parametrize("kind", SOURCES)
def test_tied_weights_stay_tied(tmp_path: Path, kind: str) -> None:
    src = fill_(TiedLM(), 1)
    dst = fill_(TiedLM(), 2)
    report = torchkeep.load_into(dst, source_of(src.state_dict(), kind, tmp_path))
    assert report.ok
    assert dst.out.weight is dst.emb.weight
    assert torch.equal(dst.emb.weight, src.emb.weight)
    ids = torch.tensor([1, 2, 3])
    assert torch.equal(dst(ids), src(ids))


@pytest.mark.parametrize("kind", SOURCES)
@pytest.mark.parametrize("dropped", ["out.weight", "emb.weight"])
def test_a_tie_the_writer_dropped_loads_through_the_module(
    tmp_path: Path, kind: str, dropped: str
) -> None:
    # save_pretrained and safetensors.torch.save_model store a tied tensor under one name only
    src = fill_(TiedLM(), 1)
    state = {k: v for k, v in src.state_dict().items() if k != dropped}
    kept = "emb.weight" if dropped == "out.weight" else "out.weight"
    dst = fill_(TiedLM(), 2)
    report = torchkeep.load_into(dst, source_of(state, kind, tmp_path))  # strict by default
    assert report.ok and report.missing == ()
    assert report.loaded == (kept,) and report.tied == (Tie(key=dropped, to=kept),)
    assert dst.out.weight is dst.emb.weight and torch.equal(dst.emb.weight, src.emb.weight)
    assert "1 tied" in str(report) and f"through {kept}" in str(report)
    assert report.to_dict()["tied"] == [{"key": dropped, "to": kept}]


class TiedHeads(nn.Module):
    """Two heads tied to one embedding, a buffer sharing a parameter's memory, an untied layer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.a = nn.Linear(3, 5, bias=False)
        self.b = nn.Linear(3, 5, bias=False)
        self.a.weight = self.emb.weight
        self.b.weight = self.emb.weight
        self.register_buffer("view", self.emb.weight.data)  # same memory, another tensor
        self.fc = nn.Linear(3, 3)


def test_ties_of_several_names_and_of_shared_memory() -> None:
    src = fill_(TiedHeads(), 1)
    state = {k: v for k, v in src.state_dict().items() if k in ("b.weight", "fc.weight", "fc.bias")}
    dst = fill_(TiedHeads(), 2)
    report = torchkeep.load_into(dst, state)
    assert report.ok
    assert {(t.key, t.to) for t in report.tied} == {
        ("emb.weight", "b.weight"),
        ("a.weight", "b.weight"),
        ("view", "b.weight"),
    }
    assert torch.equal(dst.view, src.emb.weight) and torch.equal(dst.a.weight, src.b.weight)


def test_a_tie_whose_counterpart_is_missing_too_stays_missing() -> None:
    src = fill_(TiedHeads(), 1)
    state = {k: v for k, v in src.state_dict().items() if k.startswith("fc.")}
    dst = TiedHeads()
    with pytest.raises(IncompatibleStateError, match="4 missing"):
        torchkeep.load_into(dst, state)
    report = torchkeep.load_into(dst, state, strict=False)
    assert set(report.missing) == {"emb.weight", "a.weight", "b.weight", "view"}
    assert report.tied == ()


def test_a_tie_whose_counterpart_has_another_shape_is_not_loaded() -> None:
    state = {"emb.weight": torch.ones(7, 6)}  # TiedLM(11, 6) expects (11, 6)
    dst = fill_(TiedLM(), 2)
    before = snapshot(dst)
    with pytest.raises(IncompatibleStateError, match="no tensor would be loaded") as err:
        torchkeep.load_into(dst, state, strict=False, skip_mismatched=True)
    hint = err.value.hint or ""
    assert "(1, e.g. 'emb.weight') differ in shape" in hint and "skip_mismatched" not in hint
    assert_state(dst, before)
    with pytest.raises(IncompatibleStateError) as err:
        torchkeep.load_into(dst, state)
    report = err.value.report
    assert report.missing == ("out.weight",) and report.tied == ()
    assert [m.key for m in report.mismatched] == ["emb.weight"]


def test_a_load_that_would_load_nothing_is_refused_whatever_strict_says() -> None:
    dst = fill_(MLP(), 2)
    before = snapshot(dst)
    src = fill_(MLP(), 1)
    state: dict[str, Any] = {f"encoder.{k}": v for k, v in src.state_dict().items()}
    state["decoder.w"] = torch.ones(1)  # no prefix all keys share: nothing is stripped
    with pytest.raises(IncompatibleStateError, match="no tensor would be loaded") as err:
        torchkeep.load_into(dst, state, strict=False)
    hint = err.value.hint or ""
    assert "'encoder.'" in hint and "strict=False" not in hint
    assert "rename={'^encoder\\\\.': ''}" in hint, hint
    assert_state(dst, before)
    report = torchkeep.load_into(dst, state, strict=False, rename={r"^encoder\.": ""})
    assert report.unexpected == ("decoder.w",)
    assert_state(dst, snapshot(src))


@pytest.mark.parametrize("kind", SOURCES)
def test_non_contiguous_parameter(tmp_path: Path, kind: str) -> None:
    src = fill_(TransposedWeight(), 1)
    dst = fill_(TransposedWeight(), 2)
    stride = dst.w.stride()
    torchkeep.load_into(dst, source_of(src.state_dict(), kind, tmp_path))
    assert torch.equal(dst.w, src.w)
    assert dst.w.stride() == stride  # loaded into the existing (transposed) memory


@pytest.mark.parametrize("kind", SOURCES)
def test_dtype_of_the_module_wins(tmp_path: Path, kind: str) -> None:
    src = fill_(MLP(), 1)
    sd16 = {k: v.half() for k, v in src.state_dict().items()}
    dst = MLP()
    torchkeep.load_into(dst, source_of(sd16, kind, tmp_path))
    assert dst.fc1.weight.dtype == torch.float32
    assert torch.equal(dst.fc1.weight, sd16["fc1.weight"].float())
    dst64 = MLP().double()
    torchkeep.load_into(dst64, source_of(src.state_dict(), kind, tmp_path))
    assert dst64.fc2.weight.dtype == torch.float64
    assert torch.equal(dst64.fc2.weight, src.fc2.weight.double())


@pytest.mark.parametrize("kind", SOURCES)
def test_non_persistent_buffers(tmp_path: Path, kind: str) -> None:
    src = fill_(NonPersistentBufferNet(), 1)
    src.steps.fill_(5)
    src.scratch.fill_(-1.0)
    assert "scratch" not in src.state_dict()
    dst = NonPersistentBufferNet()
    report = torchkeep.load_into(dst, source_of(src.state_dict(), kind, tmp_path))
    assert report.ok and "scratch" not in report.loaded
    assert dst.steps.item() == 5
    assert torch.equal(dst.scratch, torch.full((4,), 7.0))  # left alone
    # a checkpoint that has it (saved when it was persistent) is unexpected
    sd = dict(src.state_dict())
    sd["scratch"] = torch.zeros(4)
    with pytest.raises(IncompatibleStateError, match="scratch"):
        torchkeep.load_into(dst, source_of(sd, kind, tmp_path))
    report = torchkeep.load_into(dst, source_of(sd, kind, tmp_path), strict=False)
    assert report.unexpected == ("scratch",)
    assert torch.equal(dst.scratch, torch.full((4,), 7.0))


@pytest.mark.parametrize("kind", SOURCES)
def test_extra_state_goes_through_the_module_own_loading(tmp_path: Path, kind: str) -> None:
    src = fill_(ExtraStateNet(), 1)
    src.counter, src.tag = 41, "trained"
    dst = ExtraStateNet()
    report = torchkeep.load_into(dst, source_of(src.state_dict(), kind, tmp_path))
    assert "_extra_state" in report.loaded
    assert (dst.counter, dst.tag) == (41, "trained")
    assert torch.equal(dst.fc.weight, src.fc.weight)


def test_load_state_dict_hooks_are_honoured() -> None:
    src = fill_(MLP(), 1)
    dst = MLP()
    seen: list[str] = []

    def pre_hook(module: nn.Module, state_dict: Any, prefix: str, *args: Any) -> None:
        seen.append(prefix)

    dst.fc1.register_load_state_dict_pre_hook(pre_hook)
    torchkeep.load_into(dst, src.state_dict())
    assert seen == ["fc1."]
    assert torch.equal(dst.fc1.weight, src.fc1.weight)


def test_batchnorm_running_stats_and_counter(tmp_path: Path) -> None:
    src = BNNet().train()
    for _ in range(3):
        src(torch.randn(16, 4))
    path = tmp_path / "bn.safetensors"
    torchkeep.save({"model_state_dict": src.state_dict()}, path)
    dst = BNNet()
    torchkeep.load_into(dst, path)
    assert dst.bn.num_batches_tracked.item() == 3
    assert torch.equal(dst.bn.running_mean, src.bn.running_mean)
    assert torch.equal(dst.bn.running_var, src.bn.running_var)
    x = torch.randn(5, 4)
    assert torch.equal(dst.eval()(x), src.eval()(x))


def test_loading_twice_from_the_same_file(tmp_path: Path) -> None:
    src = fill_(MLP(), 1)
    path = tmp_path / "m.safetensors"
    torchkeep.save(src.state_dict(), path)
    dst = MLP()
    torchkeep.load_into(dst, path)
    with torch.no_grad():
        for p in dst.parameters():
            p.zero_()
    torchkeep.load_into(dst, path)
    assert_state(dst, snapshot(src))


def test_file_replaced_by_a_new_save_between_loads(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    a, b = fill_(MLP(), 1), fill_(MLP(), 2)
    torchkeep.save(a.state_dict(), path)
    dst = MLP()
    torchkeep.load_into(dst, path)
    torchkeep.save(b.state_dict(), path)
    torchkeep.load_into(dst, path)
    assert_state(dst, snapshot(b))


def test_load_into_from_a_save_model_directory(tmp_path: Path) -> None:
    src = fill_(MLP(), 5)
    torchkeep.save_model(src, tmp_path / "dir", config={"d_in": 4, "hidden": 8, "d_out": 3})
    dst = MLP()
    report = torchkeep.load_into(dst, tmp_path / "dir")
    assert report.ok
    assert_state(dst, snapshot(src))


def test_report_str_and_dict() -> None:
    report = LoadReport(
        loaded=("a",),
        missing=("b",),
        unexpected=("c",),
        mismatched=(Mismatch(key="d", expected=(1, 2), found=(3,)),),
        tied=(Tie(key="e", to="a"),),
        source="x.safetensors",
        entry="model",
    )
    text = str(report)
    assert text.startswith("LoadReport: 1 loaded, 1 missing, 1 unexpected, 1 mismatched, 1 tied")
    for needle in ("b", "missing", "c", "unexpected", "d", "(1, 2)", "(3)", "through a"):
        assert needle in text
    assert report.table().splitlines()[-1].split() == ["e", "tied", "present", "through", "a"]
    assert report.to_dict() == {
        "source": "x.safetensors",
        "entry": "model",
        "loaded": ["a"],
        "missing": ["b"],
        "unexpected": ["c"],
        "mismatched": [{"key": "d", "expected": [1, 2], "found": [3]}],
        "tied": [{"key": "e", "to": "a"}],
        "renamed": [],
    }
    assert LoadReport(loaded=("a",)).table() == ""
