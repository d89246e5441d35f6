"""torchkeep.diff and torchkeep.convert on real files."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import torchkeep as tk


def test_diff_reports_added_removed_changed_identical(tmp_path: Path) -> None:
    a = {
        "w": torch.ones(2, 3),
        "b": torch.zeros(3),
        "old": torch.ones(1),
        "nan": torch.tensor([math.nan]),
    }
    b = {
        "w": torch.ones(2, 3) + 0.25,
        "b": torch.zeros(3),
        "new": torch.ones(1),
        "nan": torch.tensor([math.nan]),
    }
    tk.save(a, tmp_path / "a.safetensors")
    tk.save(b, tmp_path / "b.pt")
    report = tk.diff(tmp_path / "a.safetensors", tmp_path / "b.pt")
    assert report.added == ("new",) and report.removed == ("old",)
    assert [c.key for c in report.changed] == ["w"]
    assert report.changed[0].max_abs_diff == pytest.approx(0.25)
    assert set(report.identical) == {"b", "nan"}
    assert report.summary == "1 added, 1 removed, 1 changed (0 in shape or dtype), 2 identical"
    assert report.to_dict()["changed"][0]["key"] == "w"


def test_diff_shape_and_dtype_changes_and_identity(tmp_path: Path) -> None:
    tk.save({"x": torch.ones(2), "y": torch.ones(3)}, tmp_path / "a.safetensors")
    tk.save(
        {"x": torch.ones(3), "y": torch.ones(3, dtype=torch.float64)}, tmp_path / "b.safetensors"
    )
    report = tk.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    by_key = {c.key: c for c in report.changed}
    assert by_key["x"].shape == ((2,), (3,)) and by_key["x"].max_abs_diff is None
    assert by_key["y"].dtype == ("float32", "float64") and by_key["y"].max_abs_diff == 0.0
    same = tk.diff(tmp_path / "a.safetensors", tmp_path / "a.safetensors")
    assert same.same and same.summary.startswith("identical: 2 tensors")


def test_convert_legacy_pt_to_safetensors_keeps_the_structure(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    ckpt = {"epoch": 4, "model_state_dict": model.state_dict(), "loss": torch.tensor(0.5)}
    torch.save(ckpt, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    info = tk.convert(tmp_path / "old.pt", tmp_path / "new.safetensors")
    assert info.format == "torchkeep"
    back = tk.load(tmp_path / "new.safetensors")
    assert back["epoch"] == 4 and torch.equal(back["model_state_dict"]["weight"], model.weight)
    assert info.metadata["converted_from"].endswith("old.pt")


def test_convert_strip_rename_only_and_dtype(tmp_path: Path) -> None:
    state = {
        "module.encoder.weight": torch.randn(4, 4),
        "module.encoder.bias": torch.randn(4),
        "module.head.weight": torch.randn(2, 4),
        "module.step": torch.tensor(7),
    }
    tk.save({"state_dict": state, "epoch": 1}, tmp_path / "src.ckpt")
    tk.convert(
        tmp_path / "src.ckpt",
        tmp_path / "out.safetensors",
        strip_prefix="module.",
        rename={r"^encoder\.": "backbone."},
        dtype=torch.bfloat16,
        only=["module.encoder.*", "module.step"],
    )
    out = tk.load(tmp_path / "out.safetensors")
    assert set(out) == {"backbone.weight", "backbone.bias", "step"}
    assert out["backbone.weight"].dtype == torch.bfloat16 and out["step"].dtype == torch.int64
    assert torch.equal(out["backbone.weight"], state["module.encoder.weight"].to(torch.bfloat16))
    with pytest.raises(tk.IncompatibleStateError, match="no tensor key matches"):
        tk.convert(tmp_path / "src.ckpt", tmp_path / "x.safetensors", only="nothing.*")
    assert not (tmp_path / "x.safetensors").exists()


def test_convert_refuses_unsafe_pickles(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("pwned",))

    torch.save({"x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(tk.UnsafeCheckpointError):
        tk.convert(tmp_path / "evil.pt", tmp_path / "evil.safetensors")
    assert not (tmp_path / "evil.safetensors").exists()


@pytest.mark.parametrize("name", ["out.onnx", "out.npz", "out"])
def test_convert_to_a_suffix_it_cannot_write_lists_the_formats(tmp_path: Path, name: str) -> None:
    # It used to write a safetensors file under any name: `out.onnx` that is no ONNX model.
    tk.save({"w": torch.zeros(2)}, tmp_path / "in.safetensors")
    with pytest.raises(tk.InvalidArgumentError, match="convert cannot write") as caught:
        tk.convert(tmp_path / "in.safetensors", tmp_path / name)
    text = str(caught.value)
    for suffix in (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".tar"):
        assert suffix in text
    assert str(tmp_path / name) in text
    assert not (tmp_path / name).exists()
    if name == "out.onnx":
        assert "torchkeep.export" in (caught.value.hint or "")
    assert tk.convert(tmp_path / "in.safetensors", tmp_path / "out.PT").format == "torch-zip"
