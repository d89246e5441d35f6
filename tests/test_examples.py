"""The examples run as users would run them (``python examples/NAME.py WORKDIR``), and what they
show is checked: from their output, and again from the files they wrote."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torchkeep as tk

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, workdir: Path, timeout: int = 300) -> str:
    """Run one example in a fresh process; its stdout, after checking it exited 0."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), str(workdir)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=workdir,
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout


def test_the_eight_tutorial_examples_exist() -> None:
    names = sorted(p.name for p in EXAMPLES.glob("0*.py"))
    assert names == [
        "01_basic_save_load.py",
        "02_checkpoint_manager.py",
        "03_model_versioning.py",
        "04_onnx_export.py",
        "05_torchscript_export.py",
        "06_transfer_learning.py",
        "07_distributed_training.py",
        "08_complete_workflow.py",
    ]


def test_finetune_example(tmp_path: Path) -> None:
    out = run_example("finetune.py", tmp_path)
    assert "stripped prefix 'module.'" in out
    assert "2 mismatched" in out
    assert "predictions identical: yes" in out
    assert (tmp_path / "ft.safetensors").is_file()


def test_01_basic_save_load(tmp_path: Path) -> None:
    out = run_example("01_basic_save_load.py", tmp_path)
    # The pickle torch.save(model) hides, found by the scan and refused by both loaders.
    assert re.search(r"unsafe to load \(they run code\): __main__\.TheModelClass", out)
    assert "torch.save(model.state_dict()) unsafe globals: 0" in out
    assert "torch.load(entire_model.pt): UnpicklingError: Weights only load failed" in out
    assert "tk.load(entire_model.pt): UnsafeCheckpointError" in out
    assert "save_model/load_model: TheModelClass, predictions identical: yes" in out
    assert "state dict reloaded: predictions identical: yes" in out
    assert "epoch 5," in out and f"pytorch_version {torch.__version__}" in out
    assert "optimizer state (momentum buffers) identical: yes" in out
    assert "map_location='cpu': cpu" in out
    if torch.cuda.is_available():
        assert "map_location='cuda:0': cuda:0" in out
    assert "train(): two calls on the same input differ (dropout): yes" in out
    assert "eval(): matches the saved model: yes" in out
    sizes = dict(re.findall(r"^(\S+)\s+(\d+) bytes$", out, flags=re.M))
    assert set(sizes) == {"state_dict.pt", "entire_model.pt", "model", "general.safetensors"}
    assert int(sizes["entire_model.pt"]) == (tmp_path / "entire_model.pt").stat().st_size
    # And from the files: the general checkpoint holds what the tutorial puts in it.
    general = tk.load(tmp_path / "general.safetensors")
    assert general["epoch"] == 5 and general["pytorch_version"] == torch.__version__
    assert {"model_state_dict", "optimizer_state_dict", "loss"} <= set(general)
    assert tk.inspect(tmp_path / "general.safetensors").metadata["lr"] == 0.001
    assert not tk.scan(tmp_path / "state_dict.pt").unsafe  # type: ignore[union-attr]


def test_02_checkpoint_manager(tmp_path: Path) -> None:
    out = run_example("02_checkpoint_manager.py", tmp_path)
    assert "RUN@best equals the deepcopy of the best state dict: yes" in out
    best = int(re.search(r"best by the manager: step (\d+)", out).group(1))  # type: ignore[union-attr]
    assert "kept steps: [" in out
    assert out.count("reproduced: yes") == 3 and "reproduced: NO" not in out
    assert "kept because" in out  # the torchkeep ls table
    with tk.CheckpointManager(tmp_path / "run", read_only=True) as mgr:
        kept = [c.step for c in mgr.checkpoints]
        assert mgr.best is not None and mgr.best.step == best
        losses = [h["metrics"]["val_loss"] for h in mgr.history]
    assert len(losses) == 8 and best == losses.index(min(losses))
    assert kept == sorted({best, 6, 7}), "keep_last=2 and keep_best=1"
    assert f"kept steps: {kept}" in out


def test_03_model_versioning(tmp_path: Path) -> None:
    out = run_example("03_model_versioning.py", tmp_path)
    assert "registered classifier version 1" in out
    assert "registering identical weights returns version 2 (duplicate: True)" in out
    assert "production: 1 -> 2" in out
    assert "identical in versions 1 and 2 (frozen): backbone.0.weight, backbone.0.bias" in out
    assert "verify version 2: ok" in out
    assert "get('classifier', 'production') predictions identical: yes" in out
    assert "metadata JSON fingerprint matches: yes" in out
    assert (tmp_path / "classifier-v2.json").is_file()


def test_04_onnx_export(tmp_path: Path) -> None:
    import onnxruntime as ort  # the onnx extra is part of make install: missing fails, never skips

    out = run_example("04_onnx_export.py", tmp_path)
    assert "plain.onnx input shape: [2, 7]" in out
    assert "plain.onnx on a batch of 3: InvalidArgument" in out
    assert "dynamic axes of input_ids: {0: 'batch', 1: 'seq'}" in out
    assert "export verified: yes" in out
    assert "onnxruntime on batch 5, seq 11: shape (5, 4)" in out
    assert "matches the eager model: yes" in out
    assert "ExportVerificationError" in out and "written: False" in out
    assert not (tmp_path / "strict.onnx").exists()
    # The file itself has symbolic batch and sequence dimensions.
    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    assert all(isinstance(d, str) for d in session.get_inputs()[0].shape)


def test_05_torchscript_export(tmp_path: Path) -> None:
    out = run_example("05_torchscript_export.py", tmp_path)
    assert "TracerWarning" in out
    error = float(re.search(r"max abs error against eager ([\d.]+)", out).group(1))  # type: ignore[union-attr]
    assert error > 0.01, "the trace must be shown to be wrong"
    assert "ExportVerificationError: mismatch on batch 1" in out
    assert "traced.pt written: False" in out and not (tmp_path / "traced.pt").exists()
    assert "scripted model on the small input matches eager: yes" in out
    assert "ExportError: capturing the model with torch.export failed" in out
    assert "torch.where" in out
    assert "torch.export with torch.where matches eager on both branches: yes" in out
    assert (tmp_path / "scripted.pt").is_file() and (tmp_path / "rescale_where.pt2").is_file()


def test_06_transfer_learning(tmp_path: Path) -> None:
    out = run_example("06_transfer_learning.py", tmp_path)
    assert "plain load_state_dict: RuntimeError: Error(s) in loading state_dict" in out
    assert "LoadReport: 9 loaded, 4 missing, 2 unexpected, 0 mismatched" in out
    assert (
        "unexpected (the old classifier, ignored): ('classifier.weight', 'classifier.bias')" in out
    )
    assert "backbone weights and BatchNorm statistics unchanged: yes" in out
    assert "0 changed" in out and "9 identical" in out  # tk.diff of pretrained vs phase 1
    assert "after unfreeze, backbone in the optimizer: NO" in out
    assert "after add_param_group, backbone in the optimizer: yes" in out
    assert "backbone moved: yes" in out
    assert "reloaded fine-tuned model: predictions identical: yes" in out


@pytest.mark.slow
def test_07_distributed_training(tmp_path: Path) -> None:
    out = run_example("07_distributed_training.py", tmp_path)
    assert "plain load_state_dict: RuntimeError" in out
    assert "unwrapped model predicts what the DataParallel one does: yes" in out
    assert "[train] rank 0 of 2: saved after 5 steps" in out
    assert "portable checkpoint values: {'step': 5, 'world_size': 2}" in out
    assert "[load] world size 3, checkpoint from world size 2" in out
    assert "added prefix 'module.'" in out
    assert "all 3 ranks predict what the saved model did: yes" in out
    assert "single process predicts what rank 0 saved: yes" in out
    portable = tk.inspect(tmp_path / "portable.safetensors")
    assert not any(t.name.startswith("module.") for t in portable.tensors)


@pytest.mark.slow
def test_08_complete_workflow(tmp_path: Path) -> None:
    out = run_example("08_complete_workflow.py", tmp_path)
    assert "[run] stopping after 3 epochs" in out
    assert "[run] resumed from epoch 2" in out
    assert "resumed equals uninterrupted bit for bit: yes" in out
    assert "metric histories equal: yes" in out
    assert "plain resume (model + optimizer + epoch only) equals uninterrupted: NO" in out
    assert "reloaded accuracy equals the recorded val_acc: yes" in out
    # Checked again here, from the two runs on disk.
    report = tk.diff(f"{tmp_path / 'run'}@latest", f"{tmp_path / 'run-uninterrupted'}@latest")
    assert not report.changed and not report.added and not report.removed
    assert len(report.identical) > 0
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with tk.CheckpointManager(tmp_path / "run", read_only=True) as mgr:
        assert [h["step"] for h in mgr.history] == list(range(6))
        assert mgr.latest is not None and mgr.latest.metadata["batch_size"] == 32
