"""Checkpoint directories made by the real peers: a Trainer ``checkpoint-N/``, Accelerate state.

``inspect``, ``verify`` and ``scan`` cover every file of such a directory: side files are shown,
not called corrupt; a damaged or unsafe file makes ``verify``/``scan`` fail, naming it.

The directories are made once per module, in a fresh process (Trainer and Accelerator keep
process-wide state). Whether ``rng_state.pth`` and ``random_states_0.pkl`` (numpy RNG states)
scan as safe depends on torchkeep's allow-list; the assertions take the scanner's verdict for
them, and require only ``training_args.bin`` (a pickled ``TrainingArguments``) to be unsafe.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

import torchkeep as tk
from torchkeep.cli import app

pytestmark = pytest.mark.slow  # one fresh process with transformers, Trainer and Accelerate

_MAKE = r"""
import sys, warnings
warnings.simplefilter("ignore")
from pathlib import Path
import torch, accelerate
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

root = Path(sys.argv[1])
torch.manual_seed(0)
config = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=16, max_position_embeddings=16)

class Data(torch.utils.data.Dataset):
    def __len__(self): return 8
    def __getitem__(self, i): return {"input_ids": torch.tensor([1, 2, 3, 4]), "labels": torch.tensor(i % 2)}

args = TrainingArguments(output_dir=str(root / "trainer"), max_steps=2, save_steps=1,
                         per_device_train_batch_size=4, report_to=[], use_cpu=True,
                         disable_tqdm=True)
Trainer(model=BertForSequenceClassification(config), args=args, train_dataset=Data()).train()

accelerator = accelerate.Accelerator(cpu=True)
model = torch.nn.Linear(64, 64)
opt = torch.optim.Adam(model.parameters())
model, opt = accelerator.prepare(model, opt)
model(torch.ones(2, 64)).sum().backward()
opt.step()
accelerator.save_state(str(root / "accelerate"))
"""

TRAINER_FILES = {
    "config.json",
    "model.safetensors",
    "optimizer.pt",
    "rng_state.pth",
    "scheduler.pt",
    "trainer_state.json",
    "training_args.bin",
}
SIDE_FILES = {"config.json", "trainer_state.json"}


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("peers")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _MAKE, str(root)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.fixture
def trainer_dir(peers: Path, tmp_path: Path) -> Path:
    """A private copy of the Trainer's last checkpoint, free to damage."""
    source = peers / "trainer" / "checkpoint-2"
    assert {p.name for p in source.iterdir()} == TRAINER_FILES
    return Path(shutil.copytree(source, tmp_path / "checkpoint-2"))


def unsafe_by_scanner(directory: Path) -> set[str]:
    """The pickle files of ``directory`` the scanner itself calls unsafe, one file at a time."""
    names = set()
    for p in directory.iterdir():
        if p.suffix in (".pt", ".pth", ".bin", ".pkl") and not tk.scan(p).is_safe:
            names.add(p.name)
    return names


def test_inspect_lists_every_file_of_a_trainer_checkpoint(trainer_dir: Path) -> None:
    info = tk.inspect(trainer_dir)
    assert info.format == "checkpoint-dir"
    files = {f.name: f for f in info.files}
    assert set(files) == TRAINER_FILES
    for name in SIDE_FILES:
        assert files[name].kind == "side-file" and files[name].problem is None
        assert files[name].file_bytes == (trainer_dir / name).stat().st_size
    assert "global_step 2" in files["trainer_state.json"].summary
    assert files["model.safetensors"].format == "safetensors" and files["model.safetensors"].tensors
    assert files["optimizer.pt"].format == "torch-zip" and files["optimizer.pt"].tensors
    problem = files["training_args.bin"].problem
    assert problem is not None and "TrainingArguments" in problem
    n_model = files["model.safetensors"].tensors
    assert sum(t.name.startswith("model.safetensors/") for t in info.tensors) == n_model
    assert info.to_dict()["files"][0]["name"] == "config.json"

    result = CliRunner().invoke(app, ["inspect", str(trainer_dir)])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert "side-file" in rows["trainer_state.json"] and "json" in rows["trainer_state.json"]
    assert "unsafe" in rows["training_args.bin"]
    assert "corrupt" not in result.stdout.lower() and "damaged" not in result.stdout.lower()
    as_json = CliRunner().invoke(app, ["inspect", "--json", str(trainer_dir)])
    assert {f["name"] for f in json.loads(as_json.stdout)["files"]} == TRAINER_FILES


def test_scan_and_verify_name_every_unsafe_file(trainer_dir: Path) -> None:
    unsafe = unsafe_by_scanner(trainer_dir)
    assert "training_args.bin" in unsafe  # a pickled TrainingArguments object
    assert unsafe <= {"training_args.bin", "rng_state.pth"}  # rng_state: per the allow-list

    found = tk.scan(trainer_dir)
    assert not found.is_safe  # not "safe" because model.safetensors is
    assert isinstance(found, tk.DirectoryScan) and set(found.unsafe_files) == unsafe
    assert "transformers.training_args.TrainingArguments" in found.unsafe
    assert set(found.skipped) == SIDE_FILES and not found.damaged

    report = tk.verify(trainer_dir)
    assert not report.ok and report.kind == "directory"
    checks = {f.path: f for f in report.files}
    assert set(checks) == TRAINER_FILES
    assert {n for n, f in checks.items() if f.status == "unsafe"} == unsafe
    assert all(any(p.startswith(f"{n}: ") for p in report.problems) for n in unsafe)
    assert {n for n, f in checks.items() if f.status == "side-file"} == SIDE_FILES
    model = checks["model.safetensors"]  # plain safetensors: no hashes, said so
    assert model.ok and model.check is None and model.hashed == 0 and model.structural > 0
    optimizer = checks["optimizer.pt"]  # a torch zip from elsewhere: its CRC-32s
    assert optimizer.ok and optimizer.check == "crc32" and optimizer.hashed == optimizer.tensors
    assert optimizer.tensors > 0 and optimizer.damaged == 0

    scanned = CliRunner().invoke(app, ["scan", str(trainer_dir)])
    assert scanned.exit_code == 1
    heading = scanned.stdout.splitlines()[0]
    assert "UNSAFE" in heading and all(n in heading for n in unsafe)
    scanned_json = CliRunner().invoke(app, ["scan", "--json", str(trainer_dir)])
    assert scanned_json.exit_code == 1
    (as_dict,) = json.loads(scanned_json.stdout)
    assert as_dict["is_safe"] is False and set(as_dict["unsafe_files"]) == unsafe
    verified = CliRunner().invoke(app, ["verify", str(trainer_dir)])
    assert verified.exit_code == 1
    lines = verified.stdout.splitlines()
    assert any(line.strip().startswith("training_args.bin: UNSAFE") for line in lines)
    assert any(line.strip().startswith("trainer_state.json: side file") for line in lines)
    assert any(
        line.strip().startswith("model.safetensors: structure OK, no stored hashes")
        for line in lines
    )
    as_json = json.loads(CliRunner().invoke(app, ["verify", "--json", str(trainer_dir)]).stdout)
    entry = next(f for f in as_json[0]["files"] if f["path"] == "optimizer.pt")
    assert entry["hashed"] == optimizer.hashed and entry["structural"] == 0


def test_verify_names_each_damaged_file(trainer_dir: Path) -> None:
    (trainer_dir / "training_args.bin").unlink()  # leave damage as the only reason to fail
    (trainer_dir / "rng_state.pth").unlink()
    assert tk.verify(trainer_dir).ok
    optimizer = trainer_dir / "optimizer.pt"
    with zipfile.ZipFile(optimizer) as archive:  # the largest tensor storage past the first 4 KiB
        info = max(
            (i for i in archive.infolist() if "/data/" in i.filename and i.header_offset > 4096),
            key=lambda i: i.file_size,
        )
    data = bytearray(optimizer.read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    data[info.header_offset + 30 + name_len + extra_len + info.file_size // 2] ^= 0x04
    optimizer.write_bytes(bytes(data))
    model = trainer_dir / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-100])  # truncated: plain safetensors show it so
    (trainer_dir / "trainer_state.json").write_text('{"global_step": 2, ')

    report = tk.verify(trainer_dir)
    assert not report.ok
    damaged = {f.path for f in report.files if f.status == "damaged"}
    assert damaged == {"optimizer.pt", "model.safetensors", "trainer_state.json"}
    assert next(f for f in report.files if f.path == "optimizer.pt").damaged >= 1
    assert {"config.json", "scheduler.pt"} <= {f.path for f in report.files if f.ok}
    for name in damaged:
        assert any(p.startswith(f"{name}: ") for p in report.problems), name

    result = CliRunner().invoke(app, ["verify", str(trainer_dir)])
    assert result.exit_code == 1
    for name in damaged:
        assert f"{name}: DAMAGED" in result.stdout


def test_accelerate_state_directory(peers: Path) -> None:
    state = peers / "accelerate"
    names = {p.name for p in state.iterdir()}
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl"} <= names
    info = tk.inspect(state)
    files = {f.name: f for f in info.files}
    assert set(files) == names
    assert files["optimizer.bin"].format == "torch-zip" and files["optimizer.bin"].tensors
    unsafe = unsafe_by_scanner(state)  # random_states_0.pkl: per the allow-list
    report = tk.verify(state)
    assert report.ok == (not unsafe)
    assert {f.path for f in report.files if f.status == "unsafe"} == unsafe
    optimizer = next(f for f in report.files if f.path == "optimizer.bin")
    assert optimizer.ok and optimizer.check == "crc32"
    assert optimizer.hashed == optimizer.tensors == files["optimizer.bin"].tensors
    found = tk.scan(state)
    assert isinstance(found, tk.DirectoryScan) and set(found.unsafe_files) == unsafe


def test_loading_a_checkpoint_directory_still_loads_its_model(trainer_dir: Path) -> None:
    weights = tk.load(trainer_dir)
    assert set(weights) == {t.name for t in tk.inspect(trainer_dir / "model.safetensors").tensors}
