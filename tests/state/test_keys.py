"""Loading across wrappers and architectures: prefixes, rename rules, new heads, fine-tuning."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import torchkeep as tk
from torchkeep.state import adapt_keys


def net(classes: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, classes))


def same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def ddp_group(tmp_path: Path) -> Iterator[None]:
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


def test_ddp_state_into_plain_model_and_back(tmp_path: Path, ddp_group: None) -> None:
    torch.manual_seed(0)
    wrapped = nn.parallel.DistributedDataParallel(net())
    tk.save(wrapped.state_dict(), tmp_path / "ddp.safetensors")
    assert next(iter(wrapped.state_dict())).startswith("module.")
    plain = net()
    report = tk.load_into(plain, tmp_path / "ddp.safetensors")
    assert report.ok and any("'module.'" in r for r in report.renamed)
    assert same(plain, wrapped.module)
    # and a plain checkpoint into a wrapped model
    torch.manual_seed(1)
    other = net()
    tk.save(other.state_dict(), tmp_path / "plain.safetensors")
    report = tk.load_into(wrapped, tmp_path / "plain.safetensors")
    assert report.ok and any("added prefix 'module.'" in r for r in report.renamed)
    assert same(wrapped.module, other)


def test_compiled_model_state_loads_into_plain_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = net()
    compiled = torch.compile(model)  # not run: only its state_dict's keys matter here
    assert next(iter(compiled.state_dict())).startswith("_orig_mod.")
    tk.save({"model_state_dict": compiled.state_dict()}, tmp_path / "c.pt")
    fresh = net()
    report = tk.load_into(fresh, tmp_path / "c.pt")
    assert report.entry == "model_state_dict" and "torch.compile" in report.renamed[0]
    assert same(fresh, model)


def test_lightning_style_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = net()
    ckpt = {
        "epoch": 3,
        "global_step": 120,
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": {"lr": 0.1},
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    fresh = net()
    report = tk.load_into(fresh, tmp_path / "last.ckpt")
    assert report.ok and report.entry == "state_dict"
    assert same(fresh, model)


def test_explicit_rename_rules_apply_in_order_and_are_reported(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = net()
    state = {
        k.replace("0.", "encoder.").replace("2.", "fc."): v for k, v in source.state_dict().items()
    }
    tk.save(state, tmp_path / "s.safetensors")
    fresh = net()
    with pytest.raises(tk.IncompatibleStateError):
        tk.load_into(fresh, tmp_path / "s.safetensors")
    report = tk.load_into(
        fresh, tmp_path / "s.safetensors", rename={r"^encoder\.": "0.", r"^fc\.": "2."}
    )
    assert report.ok
    assert report.renamed == (
        "rename '^encoder\\\\.' -> '0.' (2 keys)",
        "rename '^fc\\\\.' -> '2.' (2 keys)",
    )
    assert same(fresh, source)


def test_ambiguous_prefix_is_not_guessed() -> None:
    # Only some keys carry "module.": stripping is not unambiguous, so nothing changes.
    mapping, notes = adapt_keys(["module.a", "b"], ["a", "b"])
    assert mapping == {"module.a": "module.a", "b": "b"} and notes == ()


def test_rename_collision_is_an_error() -> None:
    with pytest.raises(tk.IncompatibleStateError, match="both become"):
        adapt_keys(["x.a", "y.a"], ["a"], rename={r"^(x|y)\.": ""})
    with pytest.raises(tk.InvalidArgumentError, match="invalid rename pattern"):
        adapt_keys(["a"], ["a"], rename={"(": ""})


def test_new_head_with_other_number_of_classes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    backbone_model = net(classes=10)
    tk.save(backbone_model.state_dict(), tmp_path / "pre.safetensors")
    torch.manual_seed(5)
    fine = net(classes=3)
    head_before = fine[2].weight.detach().clone()
    with pytest.raises(tk.IncompatibleStateError) as err:
        tk.load_into(fine, tmp_path / "pre.safetensors", strict=False)
    assert (
        "2.weight" in str(err.value) and "(3, 8)" in str(err.value) and "(10, 8)" in str(err.value)
    )
    assert torch.equal(fine[2].weight, head_before)  # nothing changed when it raised
    report = tk.load_into(fine, tmp_path / "pre.safetensors", skip_mismatched=True)
    assert {m.key for m in report.mismatched} == {"2.weight", "2.bias"}
    assert torch.equal(fine[0].weight, backbone_model[0].weight)
    assert torch.equal(fine[2].weight, head_before)


def test_freeze_finetune_save_reload_cycle(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = net()
    frozen = tk.freeze(model, "0.*")
    assert frozen == ["0.weight", "0.bias"]
    groups = tk.trainable_param_groups(model, {"2.weight": 0.1}, weight_decay=0.0)
    assert [g["names"] for g in groups] == [["2.weight"], ["2.bias"]]
    assert groups[0]["lr"] == 0.1 and "lr" not in groups[1]
    opt = torch.optim.SGD(groups, lr=0.01)
    before = model[0].weight.detach().clone()
    loss = model(torch.randn(5, 4)).sum()
    loss.backward()
    opt.step()
    assert torch.equal(model[0].weight, before)  # frozen: untouched
    tk.save(
        {"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ft.safetensors"
    )
    reloaded = net()
    tk.load_into(reloaded, tmp_path / "ft.safetensors")
    assert same(reloaded, model)
    assert tk.unfreeze(model) == [n for n, _ in model.named_parameters()]
    assert all(p.requires_grad for p in model.parameters())


def test_freeze_pattern_that_matches_nothing_is_an_error() -> None:
    with pytest.raises(tk.InvalidArgumentError, match="matches no parameter"):
        tk.freeze(net(), "backbone.*")
    with pytest.raises(tk.InvalidArgumentError, match="matches no trainable"):
        model = net()
        tk.freeze(model, "2.*")
        tk.trainable_param_groups(model, {"2.*": 0.1})


def test_optimizer_with_other_param_groups_is_refused_on_restore(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = net()
    opt = torch.optim.Adam(model.parameters())
    with tk.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(0, {"model": model, "optimizer": opt})
        tk.freeze(model, "0.*")
        smaller = torch.optim.Adam(tk.trainable_param_groups(model))
        with pytest.raises(tk.IncompatibleStateError, match="param groups"):
            mgr.restore({"model": model, "optimizer": smaller})


class Holder(nn.Module):
    """A LightningModule-like wrapper keeping the network as ``self.model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


def _stacked(kind: str, model: nn.Module) -> nn.Module:
    """``model`` inside the real wrappers whose prefixes stack as ``kind``."""
    if kind == "module._orig_mod.":
        return nn.DataParallel(torch.compile(model))
    if kind == "_orig_mod.module.":
        return torch.compile(nn.DataParallel(model))
    return Holder(nn.DataParallel(model))


@pytest.mark.parametrize(
    ("kind", "origin"),
    [
        ("module._orig_mod.", "DataParallel/DDP, torch.compile"),
        ("_orig_mod.module.", "torch.compile, DataParallel/DDP"),
        ("model.module.", "LightningModule attribute, DataParallel/DDP"),
    ],
)
def test_stacked_wrapper_prefixes_are_stripped(tmp_path: Path, kind: str, origin: str) -> None:
    torch.manual_seed(0)
    model = net()
    wrapped = _stacked(kind, model)
    assert all(k.startswith(kind) for k in wrapped.state_dict())
    tk.save(wrapped.state_dict(), tmp_path / "w.safetensors")
    fresh = net()
    report = tk.load_into(fresh, tmp_path / "w.safetensors")
    assert report.ok and report.renamed == (f"stripped prefix {kind!r} ({origin})",)
    assert same(fresh, model)
    # and the other way: a plain checkpoint into the stacked wrappers
    torch.manual_seed(1)
    other = net()
    tk.save(other.state_dict(), tmp_path / "plain.safetensors")
    report = tk.load_into(wrapped, tmp_path / "plain.safetensors")
    assert report.ok and report.renamed == (f"added prefix {kind!r} ({origin})",)
    assert same(model, other)


def test_ddp_over_a_named_attribute_is_stripped_but_no_two_names_are_swapped() -> None:
    mapping, notes = adapt_keys(["module.net.a", "module.net.b"], ["a", "b"])
    assert mapping == {"module.net.a": "a", "module.net.b": "b"}
    assert notes == ("stripped prefix 'module.net.' (DataParallel/DDP)",)
    mapping, notes = adapt_keys(["encoder.a", "encoder.b"], ["backbone.a", "backbone.b"])
    assert mapping == {"encoder.a": "encoder.a", "encoder.b": "encoder.b"} and notes == ()


def test_compiled_checkpoint_into_a_data_parallel_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = net()
    tk.save(torch.compile(model).state_dict(), tmp_path / "c.safetensors")
    target = nn.DataParallel(net())
    report = tk.load_into(target, tmp_path / "c.safetensors")
    assert report.ok
    assert report.renamed == (
        "stripped prefix '_orig_mod.' (torch.compile)",
        "added prefix 'module.' (DataParallel/DDP)",
    )
    assert same(target.module, model)


def test_nothing_matching_is_an_error_even_when_not_strict(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = nn.Sequential()
    source.add_module("encoder", net())
    tk.save(source.state_dict(), tmp_path / "enc.safetensors")
    target = nn.Sequential()
    target.add_module("backbone", net())
    before = target.state_dict()["backbone.0.weight"].clone()
    for strict in (True, False):
        with pytest.raises(tk.IncompatibleStateError, match="no tensor would be loaded") as err:
            tk.load_into(target, tmp_path / "enc.safetensors", strict=strict)
        hint = err.value.hint or ""
        assert "strict=False" not in hint and "strict=False" not in str(err.value)
        assert "'encoder.'" in hint and "'backbone.'" in hint
        assert "rename={'^encoder\\\\.': 'backbone.'}" in hint, hint
        assert torch.equal(target.state_dict()["backbone.0.weight"], before)
    # the suggested rename works
    report = tk.load_into(target, tmp_path / "enc.safetensors", rename={r"^encoder\.": "backbone."})
    assert report.ok and same(target.backbone, source.encoder)


def test_nothing_in_common_says_so_without_suggesting_strict_false() -> None:
    state = {"conv.kernel": torch.ones(2), "conv.offset": torch.ones(1)}
    with pytest.raises(tk.IncompatibleStateError, match="no tensor would be loaded") as err:
        tk.load_into(net(), state, strict=False)
    hint = err.value.hint or ""
    assert "no prefix change aligns" in hint and "'conv.kernel'" in hint and "'0.weight'" in hint
    assert "strict=False" not in hint


def test_partial_match_still_suggests_strict_false() -> None:
    state = dict(net().state_dict())
    del state["2.bias"]
    with pytest.raises(tk.IncompatibleStateError, match="1 missing") as err:
        tk.load_into(net(), state)
    assert "strict=False" in (err.value.hint or "")
    assert tk.load_into(net(), state, strict=False).missing == ("2.bias",)


def test_pattern_learning_rates_win_over_the_default_lr() -> None:
    model = net()
    groups = tk.trainable_param_groups(model, {"2.*": 0.1}, lr=0.01, weight_decay=0.5)
    assert [g["names"] for g in groups] == [["2.weight", "2.bias"], ["0.weight", "0.bias"]]
    assert [g["lr"] for g in groups] == [0.1, 0.01]
    assert all(g["weight_decay"] == 0.5 for g in groups)
    opt = torch.optim.SGD(groups, lr=0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01]
