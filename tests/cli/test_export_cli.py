"""``torchkeep export`` driven as a user would: a real process, its stdout, stderr and exit code.

Each export runs in a subprocess (a few seconds each: importing torch and the exporters), so
the cases are few. The models live in ``tests.cli._export_models``; the subprocess finds them
through ``PYTHONPATH`` and imports them because ``--allow-import`` allows it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import torchkeep as tk
from torchkeep.cli import app

from ._export_models import AlwaysDropout, Block, TinyNet
from ._helpers import ANSI, BOX, assert_clean_error, run_torchkeep

ROOT = Path(__file__).resolve().parents[2]
# The saved models name classes of tests.cli._export_models, which the subprocess has not
# imported: importing what a file names is opt-in.
ALLOW = ("--allow-import", "tests.cli")


@pytest.fixture(autouse=True)
def importable_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the ``torchkeep`` subprocess import ``tests.cli._export_models``."""
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), *([path] if path else [])]))


def saved(model: nn.Module, tmp_path: Path) -> str:
    directory = tmp_path / type(model).__name__.lower()
    tk.save_model(model, directory)
    return str(directory)


def test_export_onnx_json(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "out.onnx"
    proc = run_torchkeep(
        "export",
        *ALLOW,
        saved(TinyNet(), tmp_path),
        "--example-shape",
        "2,4",
        "-o",
        str(out),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # the whole of stdout: nothing else was printed
    assert report["ok"] is True
    assert report["format"] == "onnx"
    assert report["path"] == str(out)
    assert report["files"] and all(Path(f).is_file() for f in report["files"])
    assert report["inputs"][0]["shape"] == [2, 4]
    assert report["inputs"][0]["dynamic"] == {"0": "batch"}
    assert isinstance(report["opset"], int)


def test_export_pt2_table(tmp_path: Path) -> None:
    out = tmp_path / "model.pt2"
    proc = run_torchkeep(
        "export", *ALLOW, saved(TinyNet(), tmp_path), "--example-shape", "2,4", "-o", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    assert out.is_file()
    text = proc.stdout
    assert f"{out}: verified" in text
    assert "max abs error" in text and "max rel error" in text
    output_rows = [line for line in text.splitlines() if line.startswith("output ")]
    assert output_rows and output_rows[-1].split()[:4] == ["output", "(2,", "3)", "float32"]
    assert "0: batch" in text and "latency" in text and "eager" in text
    assert not ANSI.search(text) and not BOX.search(text)  # piped: plain columns
    assert proc.stderr == ""


def test_export_torchscript_by_format_option(tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    proc = run_torchkeep(
        "export",
        *ALLOW,
        saved(TinyNet(), tmp_path),
        "--format",
        "torchscript",
        "--example-shape",
        "2,4",
        "--dtype",
        "float32",
        "-o",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert out.is_file()
    assert "torchscript" in proc.stdout and "TorchScript" in proc.stdout


def test_bad_arguments_are_usage_errors(runner: CliRunner, tmp_path: Path) -> None:
    out = str(tmp_path / "m.pt2")
    for args, message in [
        (["--example-shape", "2,x"], "--example-shape takes comma-separated sizes"),
        (
            ["--example-shape", "2,4", "--dtype", "float33"],
            "unknown --dtype 'float33'; use one of float32",
        ),
        (["--example-shape", "2,4", "--dtype", "int64", "--dtype", "bool"], "2 --dtype for 1"),
        (["--example-shape", "2,4", "--dynamic-dim", "0:one:seq"], "INPUT:DIM:NAME"),
        ([], "give either --example-shape"),
        (["--example-shape", "2,4", "--example-inputs", "x.safetensors"], "give either"),
    ]:
        result = runner.invoke(app, ["export", str(tmp_path / "nothing"), *args, "-o", out])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr, result.stderr
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert "Traceback" not in result.stderr
    assert not Path(out).exists()


def test_verification_failure_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "noisy.pt"
    proc = run_torchkeep(
        "export", *ALLOW, saved(AlwaysDropout(), tmp_path), "--example-shape", "2,4", "-o", str(out)
    )
    assert proc.returncode == 1
    assert not out.exists()
    assert list(tmp_path.glob("noisy*")) == []
    assert "nothing written" in proc.stdout and "MISMATCH" in proc.stdout
    assert_clean_error(proc.stderr, "ExportVerificationError")
    assert "max abs error" in proc.stderr and "max rel error" in proc.stderr


def test_data_dependent_control_flow_names_the_module(tmp_path: Path) -> None:
    out = tmp_path / "gate.pt2"
    proc = run_torchkeep(
        "export", *ALLOW, saved(Block(), tmp_path), "--example-shape", "2,4", "-o", str(out)
    )
    assert proc.returncode == 1
    assert not out.exists()
    assert proc.stdout == ""
    assert_clean_error(proc.stderr, "ExportError")
    assert "gate (Gate)" in proc.stderr
    assert "torch.export" in proc.stderr  # the step that failed
    assert "--format torchscript" in proc.stderr  # the way out, in the command's own words


def test_the_model_class_is_found_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user's models.py beside the run, no PYTHONPATH: `torchkeep export runs/x@latest` works."""
    monkeypatch.delenv("PYTHONPATH", raising=False)
    (tmp_path / "my_models.py").write_text(
        "import torch, torchkeep\n\n"
        "@torchkeep.capture_config\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self, width: int = 6):\n"
        "        super().__init__()\n"
        "        self.fc = torch.nn.Linear(4, width)\n\n"
        "    def forward(self, x):\n"
        "        return self.fc(x)\n"
    )
    train = (
        "import torchkeep as tk\nfrom my_models import Net\n"
        "with tk.CheckpointManager('runs/x') as mgr:\n"
        "    mgr.save(1, {'model': Net(width=3)})\n"
    )
    subprocess.run([sys.executable, "-c", train], cwd=tmp_path, check=True, timeout=120)
    proc = run_torchkeep(
        "export",
        "runs/x@latest",
        "--allow-import",
        "my_models",
        "--example-shape",
        "2,4",
        "-o",
        "net.pt2",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "runs/x@latest (Net)" in proc.stdout and (tmp_path / "net.pt2").is_file()


def test_a_class_from_a_module_not_allowed_is_not_imported(tmp_path: Path) -> None:
    """Importing the module a file names runs its code: the command asks for --allow-import."""
    out = tmp_path / "tiny.pt2"
    proc = run_torchkeep(
        "export", saved(TinyNet(), tmp_path), "--example-shape", "2,4", "-o", str(out)
    )
    assert proc.returncode == 1 and not out.exists()
    assert_clean_error(proc.stderr, "ModelClassError")
    assert "tests.cli._export_models:TinyNet" in proc.stderr
    assert "--allow-import tests" in proc.stderr and "model_class" not in proc.stderr


def test_real_example_inputs_from_a_file(tmp_path: Path) -> None:
    """Inputs saved by name go to forward by name; integer ids keep their values."""
    x = torch.randn(3, 4)
    tk.save({"x": x}, tmp_path / "inputs.safetensors")
    out = tmp_path / "tiny.pt2"
    proc = run_torchkeep(
        "export",
        *ALLOW,
        saved(TinyNet(), tmp_path),
        "--example-inputs",
        str(tmp_path / "inputs.safetensors"),
        "-o",
        str(out),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["inputs"] == [
        {"name": "x", "shape": [3, 4], "dtype": "float32", "dynamic": {"0": "batch"}}
    ]
    assert report["cases"] == ["example (batch 3)", "batch 1", "batch 4"]


def test_verification_failure_with_json_prints_one_document(
    runner: CliRunner, tmp_path: Path
) -> None:
    # The report is the failure's JSON document: no second (error) document after it.
    out = tmp_path / "noisy.pt"
    src = saved(AlwaysDropout(), tmp_path)
    result = runner.invoke(app, ["export", src, "--example-shape", "2,4", "-o", str(out), "--json"])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False and report["checks"] and not out.exists()
    assert result.stderr.startswith("ExportVerificationError: ")
