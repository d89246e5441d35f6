"""Transfer learning with torchkeep: train a backbone, give it a new head, fine-tune, reload.

Run: python examples/finetune.py [WORKDIR]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import torchkeep as tk


class Classifier(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU())
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def train(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    for _ in range(50):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


def main(workdir: Path) -> None:
    torch.manual_seed(0)
    # 1. Pre-train a 10-class model; save it as a DDP-style state dict ("module." prefixes).
    x, y10 = torch.randn(256, 8), torch.randint(0, 10, (256,))
    pretrained = Classifier(classes=10)
    loss = train(pretrained, torch.optim.Adam(pretrained.parameters(), lr=1e-2), x, y10)
    ddp_style = {f"module.{k}": v for k, v in pretrained.state_dict().items()}
    tk.save(ddp_style, workdir / "pretrained.safetensors", metadata={"classes": 10})
    print(f"pre-trained 10-class model, loss {loss:.3f}")

    # 2. A 3-class model: load the backbone, keep the new head as initialised.
    model = Classifier(classes=3)
    report = tk.load_into(model, workdir / "pretrained.safetensors", skip_mismatched=True)
    print(report)

    # 3. Fine-tune the head only.
    tk.freeze(model, "backbone.*")
    opt = torch.optim.Adam(tk.trainable_param_groups(model, {"head.*": 1e-2}), lr=1e-3)
    y3 = torch.randint(0, 3, (256,))
    backbone_before = model.backbone[0].weight.detach().clone()
    loss = train(model, opt, x, y3)
    assert torch.equal(model.backbone[0].weight, backbone_before), "the backbone moved"
    print(f"fine-tuned the head, loss {loss:.3f}; backbone unchanged")

    # 4. Save and reload, and check the reloaded model predicts the same.
    tk.save(
        {"model": model.state_dict(), "optimizer": opt.state_dict()}, workdir / "ft.safetensors"
    )
    reloaded = Classifier(classes=3)
    tk.load_into(reloaded, workdir / "ft.safetensors")
    model.eval()
    reloaded.eval()
    same = torch.equal(model(x), reloaded(x))
    print(f"reloaded fine-tuned model: predictions identical: {'yes' if same else 'NO'}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
