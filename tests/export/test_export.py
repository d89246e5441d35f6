"""torchkeep.export: every format, verified, loadable without the model's code; clean failures."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep as tk
from tests.export import _models as m

SUFFIX = {"onnx": ".onnx", "pt2": ".pt2", "torchscript": ".pt"}
HAS_ONNX = all(importlib.util.find_spec(x) for x in ("onnx", "onnxruntime", "onnxscript"))
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason="the onnx extra is not installed")
FORMATS = [pytest.param("onnx", marks=needs_onnx), "pt2", "torchscript"]


def _cnn() -> tuple[nn.Module, Any]:
    torch.manual_seed(0)
    model = m.SmallCNN()
    model.train()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        model(torch.randn(8, 3, 16, 16) * 3 + 1)
    return model, torch.randn(2, 3, 16, 16)


def _mlp() -> tuple[nn.Module, Any]:
    torch.manual_seed(1)
    return m.MLP(), torch.randn(4, 12)


def _block() -> tuple[nn.Module, Any]:
    torch.manual_seed(2)
    ids = torch.randint(0, 40, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.int64)
    mask[1, 6:] = 0
    return m.TransformerBlock(), (ids, mask)


MODELS = {"cnn": _cnn, "mlp": _mlp, "block": _block}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", list(MODELS))
def test_exports_verify_on_several_batch_sizes(tmp_path: Path, fmt: str, name: str) -> None:
    model, example = MODELS[name]()
    was_training = model.training
    dims = {"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}} if name == "block" else None
    out = tmp_path / f"{name}{SUFFIX[fmt]}"

    report = tk.export(model, example, out, dynamic_dims=dims)

    assert report.ok and out.is_file()
    assert report.format == fmt and report.path == str(out)
    assert report.files == [str(out)] and report.size_bytes == out.stat().st_size
    assert model.training == was_training  # modes restored
    cases = report.cases
    assert cases[0].startswith("example") and "batch 1" in cases
    if name == "block":
        assert any("seq" in c and "batch" not in c for c in cases)
        assert [s.dynamic for s in report.inputs] == [{0: "batch", 1: "seq"}] * 2
    else:
        assert report.inputs[0].dynamic == {0: "batch"}
    assert set(report.max_abs_error) == set(report.outputs)
    for check in report.checks:
        assert check.ok and check.max_abs_error <= check.atol + 1e-3
    assert report.eager_latency_ms > 0 and report.exported_latency_ms > 0
    json.dumps(report.to_dict())  # JSON-ready
    if fmt == "torchscript":
        assert any("deprecated" in n for n in report.notes)
    if fmt == "onnx":
        assert report.opset and report.opset >= 18
        assert "onnxruntime" in report.runtime


def _fresh_python(code: str, cwd: Path) -> str:
    """Run ``code`` in a new interpreter that cannot import the tests (hence the models)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("fmt", [FORMATS[0], "pt2"])
def test_artifact_runs_in_a_fresh_process_without_the_model_code(tmp_path: Path, fmt: str) -> None:
    model, (ids, mask) = _block()
    out = tmp_path / f"block{SUFFIX[fmt]}"
    tk.export(model, (ids, mask), out, dynamic_dims={0: {1: "seq"}, 1: {1: "seq"}})
    ids5, mask5 = ids.repeat(3, 2)[:5, :13], mask.repeat(3, 2)[:5, :13]
    with torch.no_grad():
        want = model.eval()(ids5, mask5)
    tk.save({"ids": ids5, "mask": mask5, **want}, tmp_path / "io.safetensors")

    stdout = _fresh_python(
        f"""
        import sys, torch, torchkeep as tk
        data = tk.load("io.safetensors")
        model = tk.load_exported({out.name!r})
        got = model(data["ids"], data["mask"])
        if isinstance(got, dict):
            got = [got["hidden"], got["pooled"]]
        if {fmt!r} == "onnx":  # the same file straight through ONNX Runtime
            import onnxruntime as ort
            session = ort.InferenceSession({out.name!r}, providers=["CPUExecutionProvider"])
            raw = session.run(None, {{"input_ids": data["ids"].numpy(),
                                      "attention_mask": data["mask"].numpy()}})
            assert all(torch.allclose(torch.from_numpy(r), g, atol=1e-5) for r, g in zip(raw, got))
        else:  # and straight through torch.export.load
            raw = torch.export.load({out.name!r}).module()(data["ids"], data["mask"])
            assert torch.equal(raw["hidden"], got[0])
        for name, g in zip(["hidden", "pooled"], got):
            torch.testing.assert_close(g, data[name], rtol=1e-4, atol=1e-5)
        assert not any(k.startswith("tests") for k in sys.modules)
        print("ok", tuple(got[0].shape))
        """,
        tmp_path,
    )
    assert stdout.strip() == "ok (5, 13, 16)"


def test_batch_of_one_is_tiled_and_the_batch_stays_symbolic(tmp_path: Path) -> None:
    model, _ = _mlp()
    report = tk.export(model, torch.randn(1, 12), tmp_path / "mlp.pt2")
    assert report.inputs[0].shape == (2, 12) and report.inputs[0].dynamic == {0: "batch"}
    assert any("batch of 1" in n for n in report.notes)
    program = torch.export.load(tmp_path / "mlp.pt2")
    x = [n for n in program.graph.nodes if n.op == "placeholder"][-1]
    assert not isinstance(x.meta["val"].shape[0], int)  # symbolic, not fixed to 1 or 2
    with torch.no_grad():
        assert program.module()(torch.randn(7, 12)).shape == (7, 3)


def test_static_batch_on_request(tmp_path: Path) -> None:
    model, x = _mlp()
    report = tk.export(model, x, tmp_path / "mlp.pt2", dynamic_batch=False)
    assert report.inputs[0].dynamic == {} and report.cases == ["example"]


def test_keyword_inputs_and_nested_outputs(tmp_path: Path) -> None:
    model, (ids, mask) = _block()
    report = tk.export(model, {"input_ids": ids, "attention_mask": mask}, tmp_path / "kw.pt2")
    assert [s.name for s in report.inputs] == ["input_ids", "attention_mask"]
    assert report.outputs == ["output['hidden']", "output['pooled']"]


def test_verification_failure_writes_nothing_and_keeps_the_previous_file(
    tmp_path: Path,
) -> None:
    out = tmp_path / "model.pt2"
    out.write_bytes(b"previous export")
    with pytest.raises(tk.ExportVerificationError) as info:
        tk.export(m.AlwaysDropout(), torch.randn(3, 4), out)
    report = info.value.report
    assert not report.ok and report.failures()
    assert "max abs error" in str(info.value) and "nothing was written" in str(info.value)
    assert out.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt2"]  # staging removed


def test_tolerances_decide(tmp_path: Path) -> None:
    model, x = _mlp()
    report = tk.export(model, x, tmp_path / "a.pt", rtol=0.5, atol=0.5)
    assert {c.rtol for c in report.checks} == {0.5}


def test_data_dependent_control_flow_names_the_module(tmp_path: Path) -> None:
    with pytest.raises(tk.ExportError) as info:
        tk.export(m.Wrapper(m.Gate()), torch.randn(2, 4), tmp_path / "g.pt2")
    err = info.value
    assert err.module == "inner (Gate)" and "_models.py" in str(err)
    assert "data-dependent" in str(err) and "torchscript" in (err.hint or "")
    assert "\x1b" not in str(err)
    assert not (tmp_path / "g.pt2").exists()


def test_gate_scripts_to_torchscript(tmp_path: Path) -> None:
    report = tk.export(m.Gate(), torch.randn(2, 4), tmp_path / "g.pt", format="torchscript")
    assert report.ok


@needs_onnx
def test_scalar_minus_int_tensor_is_a_clean_onnx_error(tmp_path: Path) -> None:
    model = m.Wrapper(m.InvertMask())
    args = (torch.randn(2, 4), torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(tk.ExportError) as info:
        tk.export(model, args, tmp_path / "x.onnx")
    err = info.value
    assert err.module == "inner (InvertMask)"
    assert err.step is not None and "step 2/3" in err.step
    assert "1.0 - mask" in str(err) and "pt2" in (err.hint or "")
    assert not re.search(r"\x1b\[", str(err))
    assert tk.export(model, args, tmp_path / "x.pt2").ok  # the suggested way out works


def test_a_hard_coded_batch_is_reported(tmp_path: Path) -> None:
    with pytest.raises(tk.ExportError) as info:
        tk.export(m.FixedBatch(), torch.randn(2, 4, 2), tmp_path / "f.pt2")
    assert "dynamic_batch=False" in (info.value.hint or "")
    assert tk.export(
        m.FixedBatch(), torch.randn(2, 4, 2), tmp_path / "f.pt2", dynamic_batch=False
    ).ok


def test_exporters_print_nothing(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    model, x = _cnn()
    tk.export(model, x, tmp_path / "c.pt2")
    with pytest.raises(tk.ExportError):
        tk.export(m.Gate(), torch.randn(2, 4), tmp_path / "g.pt2")
    out, err = capfd.readouterr()
    assert out == "" and err == ""


@needs_onnx
def test_onnx_external_data_is_one_artifact(tmp_path: Path) -> None:
    model, x = m.MLP(hidden=512), torch.randn(2, 12)
    out = tmp_path / "mlp.onnx"
    report = tk.export(model, x, out, external_data=True)
    data = tmp_path / "mlp.onnx.data"
    assert report.files == [str(out), str(data)] and data.is_file()
    assert report.size_bytes == out.stat().st_size + data.stat().st_size
    assert out.stat().st_size < data.stat().st_size
    # exported again inline: the old weights file, now referred to by nothing, goes
    tk.export(model, x, out, external_data=False)
    assert not data.exists()
    assert len(tk.load_exported(out)(x)) == 1


@needs_onnx
def test_onnx_opset_is_read_back(tmp_path: Path) -> None:
    model, x = _mlp()
    assert tk.export(model, x, tmp_path / "m.onnx", opset=18).opset == 18


def test_source_can_be_a_save_model_directory(tmp_path: Path) -> None:
    model, x = _mlp()
    tk.save_model(model, tmp_path / "saved")
    report = tk.export(str(tmp_path / "saved"), x, tmp_path / "m.pt2")
    assert report.ok and "MLP" in report.source and "saved" in report.source
    with torch.no_grad():
        assert torch.equal(tk.load_exported(tmp_path / "m.pt2")(x), model.eval()(x))


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"path_name": "m.bin"}, "suffix"),
        ({"format": "tflite"}, "unknown export format"),
        ({"dynamic_dims": {"nope": {0: "n"}}}, "not one of the tensor inputs"),
        ({"dynamic_dims": {0: {5: "n"}}}, "does not fit"),
    ],
)
def test_bad_arguments_are_clear(tmp_path: Path, kwargs: dict[str, Any], words: str) -> None:
    model, x = _mlp()
    path = tmp_path / kwargs.pop("path_name", "m.pt2")
    with pytest.raises(tk.InvalidArgumentError, match=words):
        tk.export(model, x, path, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_torchscript_needs_trust_to_load(tmp_path: Path) -> None:
    model, x = _mlp()
    tk.export(model, x, tmp_path / "m.pt")
    with pytest.raises(tk.UnsafeCheckpointError, match="trust=True"):
        tk.load_exported(tmp_path / "m.pt")
    with torch.no_grad():
        loaded = tk.load_exported(tmp_path / "m.pt", trust=True)
        torch.testing.assert_close(loaded(x), model.eval()(x))


def test_source_can_be_a_run_reference(tmp_path: Path) -> None:
    model, x = _mlp()
    with tk.CheckpointManager(tmp_path / "run", monitor="loss", mode="min") as mgr:
        mgr.save(1, {"model": model}, metrics={"loss": 0.5})
        with torch.no_grad():
            best = model.eval()(x)
            for p in model.parameters():
                p.add_(1.0)
        mgr.save(2, {"model": model}, metrics={"loss": 0.9})
    report = tk.export(f"{tmp_path / 'run'}@best", x, tmp_path / "best.pt2")
    assert report.ok and "run@best (MLP)" in report.source
    torch.testing.assert_close(tk.load_exported(tmp_path / "best.pt2")(x), best)


def test_missing_onnx_extra_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    model, x = _mlp()
    with pytest.raises(tk.ExportError, match="onnxruntime") as info:
        tk.export(model, x, tmp_path / "m.onnx")
    assert "torchkeep[onnx]" in (info.value.hint or "")
    assert list(tmp_path.iterdir()) == []


class _ReturnsAnInt(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        return x * 2, x.argmax(-1), x.shape[1]


@needs_onnx
def test_non_tensor_outputs(tmp_path: Path) -> None:
    x = torch.randn(2, 4)
    with pytest.raises(tk.ExportError, match=r"returns output\[2\] = 4"):
        tk.export(_ReturnsAnInt(), x, tmp_path / "m.onnx")
    report = tk.export(_ReturnsAnInt(), x, tmp_path / "m.pt2")  # integers compare exactly
    assert report.outputs == ["output[0]", "output[1]", "output[2]"]
    assert [c.dtype for c in report.worst()] == ["float32", "int64", "int64"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_checkpoint_readers_point_exported_files_to_load_exported(tmp_path: Path, fmt: str) -> None:
    model, x = _mlp()
    out = tmp_path / f"m{SUFFIX[fmt]}"
    tk.export(model, x, out, latency_runs=1)
    for read in (tk.load, tk.inspect):
        with pytest.raises(tk.TorchkeepError) as info:
            read(out)
        assert "load_exported" in (info.value.hint or "")


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
def test_padded_attention_verifies(tmp_path: Path) -> None:
    """nn.TransformerEncoder's eval fast path zeroes padded positions; exports compute them."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2).eval()  # nested tensors: the eval fast path
    x = torch.randn(2, 6, 16)
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
            return self.encoder(x, src_key_padding_mask=pad)

    report = tk.export(Model(), (x, pad), tmp_path / "enc.pt2", latency_runs=1)
    assert report.ok and any("fast path" in n for n in report.notes)
    assert torch.backends.mha.get_fastpath_enabled()  # restored


def test_a_killed_exports_staging_directory_is_swept(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    leftover = tmp_path / f".m.pt2.tkp-{dead.stdout.strip()}-0badc0de"
    leftover.mkdir()
    (leftover / "m.pt2").write_bytes(b"half-written")
    model, x = _mlp()
    tk.export(model, x, tmp_path / "m.pt2", latency_runs=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt2"]
