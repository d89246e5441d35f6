"""Tutorial chapter 1, saving and loading models, the torchkeep way.

The classic tutorial's points, each beside what the plain-PyTorch way gets wrong:

1. a state dict against the entire model: ``torch.save(model)`` hides a pickle of your class
   (``tk.scan`` shows it, ``torch.load`` refuses it); ``tk.save_model`` saves the whole model
   without pickle;
2. the general checkpoint dict (epoch, optimizer, loss, ``pytorch_version``) with metadata;
3. device transfer with ``map_location`` (CPU, and CUDA where present);
4. ``eval()`` against ``train()`` after loading (dropout);
5. file sizes.

Run: python examples/01_basic_save_load.py [WORKDIR]
"""

from __future__ import annotations

import re
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

import torchkeep as tk


@tk.capture_config  # records the constructor arguments, so save_model needs no pickle
class TheModelClass(nn.Module):
    """The tutorial's small CNN (on 16x16 images here, to stay fast), with a dropout."""

    def __init__(self, classes: int = 10, dropout: float = 0.5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(6 * 6 * 6, 32)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        return self.fc2(self.drop(torch.relu(self.fc1(torch.flatten(x, 1)))))


def size(path: Path) -> int:
    """Bytes of a file, or of every file under a directory."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def main(workdir: Path) -> None:
    torch.manual_seed(0)
    model = TheModelClass()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    loss = nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    model.eval()
    expected = model(x)

    print("== 1. a state dict against the entire model")
    torch.save(model.state_dict(), workdir / "state_dict.pt")
    torch.save(model, workdir / "entire_model.pt")  # the tutorial's "save entire model"
    hidden = tk.scan(workdir / "entire_model.pt")
    assert isinstance(hidden, tk.PickleScan)
    print(f"torch.save(model) pickles these globals: {', '.join(hidden.globals)}")
    print(f"unsafe to load (they run code): {', '.join(hidden.unsafe)}")
    clean = tk.scan(workdir / "state_dict.pt")
    assert isinstance(clean, tk.PickleScan)
    print(f"torch.save(model.state_dict()) unsafe globals: {len(clean.unsafe)}")
    try:
        torch.load(workdir / "entire_model.pt")  # weights_only=True is torch's default since 2.6
    except Exception as err:  # noqa: BLE001 - showing what users see
        first = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).splitlines()[0]
        print(f"torch.load(entire_model.pt): {type(err).__name__}: {first}")
    try:
        tk.load(workdir / "entire_model.pt")
    except tk.UnsafeCheckpointError as err:
        print(f"tk.load(entire_model.pt): UnsafeCheckpointError: {str(err).splitlines()[0]}")

    # The torchkeep way: the whole model, as weights plus the class's import path and arguments.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tk.save_model(model, workdir / "model")
    for warning in caught:  # a class defined in the script itself: torchkeep says what that means
        print(f"save_model warns: {str(warning.message).split(', so ')[0]}")
    loaded = tk.load_model(workdir / "model")  # TheModelClass(classes=10, dropout=0.5), eval mode
    same = torch.equal(loaded(x), expected)
    print(f"save_model/load_model: {type(loaded).__name__}, predictions identical: {yesno(same)}")
    files = sorted(p.name for p in (workdir / "model").iterdir())
    print(f"model/ holds {', '.join(files)}: tensors and JSON, no pickle")

    # A state dict into a model you build yourself, with a report of what was loaded.
    fresh = TheModelClass()
    report = tk.load_into(fresh, workdir / "state_dict.pt")
    fresh.eval()
    print(f"load_into(state_dict.pt): {report}")
    print(f"state dict reloaded: predictions identical: {yesno(torch.equal(fresh(x), expected))}")

    print("== 2. a general checkpoint for inference and resuming training")
    checkpoint = {
        "epoch": 5,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "loss": float(loss.detach()),
        "pytorch_version": torch.__version__,
    }
    tk.save(checkpoint, workdir / "general.safetensors", metadata={"lr": 0.001, "note": "ch. 1"})
    back = tk.load(workdir / "general.safetensors")
    info = tk.inspect(workdir / "general.safetensors")
    print(
        f"epoch {back['epoch']}, loss {back['loss']:.4f}, pytorch_version {back['pytorch_version']}, "
        f"metadata {info.metadata}"
    )
    resumed_model = TheModelClass()
    resumed_opt = torch.optim.SGD(resumed_model.parameters(), lr=0.1)
    tk.load_into(resumed_model, workdir / "general.safetensors")  # finds model_state_dict
    resumed_opt.load_state_dict(back["optimizer_state_dict"])
    momentum_same = all(
        torch.equal(a["momentum_buffer"], b["momentum_buffer"])
        for a, b in zip(
            resumed_opt.state_dict()["state"].values(),
            optimizer.state_dict()["state"].values(),
            strict=True,
        )
    )
    print(f"optimizer state (momentum buffers) identical: {yesno(momentum_same)}")

    print("== 3. device transfer with map_location")
    on_cpu = tk.load(workdir / "general.safetensors", map_location="cpu")
    print(f"map_location='cpu': {on_cpu['model_state_dict']['fc1.weight'].device}")
    if torch.cuda.is_available():
        on_gpu = tk.load(workdir / "general.safetensors", map_location="cuda:0")
        print(f"map_location='cuda:0': {on_gpu['model_state_dict']['fc1.weight'].device}")
        gpu_model = tk.load_model(workdir / "model", map_location="cuda:0")
        print(f"load_model(map_location='cuda:0'): {next(gpu_model.parameters()).device}")
    else:
        print("map_location='cuda:0': skipped, no CUDA device here")

    print("== 4. eval() against train() after loading")
    train_mode = tk.load_model(workdir / "model").train()
    differ = not torch.equal(train_mode(x), train_mode(x))
    print(f"train(): two calls on the same input differ (dropout): {yesno(differ)}")
    eval_mode = train_mode.eval()
    print(f"eval(): matches the saved model: {yesno(torch.equal(eval_mode(x), expected))}")

    print("== 5. file sizes")
    for name in ("state_dict.pt", "entire_model.pt", "model", "general.safetensors"):
        print(f"{name:22} {size(workdir / name):>8} bytes")


def yesno(flag: bool) -> str:
    return "yes" if flag else "NO"


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
