"""Tutorial chapter 6, transfer learning, the torchkeep way.

A small backbone is pre-trained here (a stand-in for a downloaded one) and saved. A new model
takes that backbone and a new head; the plain ``model.load_state_dict`` either refuses (strict) or
returns the missing and unexpected keys in a tuple that scripts ignore (``strict=False``).
``tk.load_into`` returns a ``LoadReport`` that names them. Then: freezing the backbone with
``tk.freeze`` (and keeping its BatchNorm statistics frozen too), optimizer groups from
``tk.trainable_param_groups``, unfreezing for a second phase at a lower learning rate (a parameter
unfrozen after the optimizer was built is not in it: it would never train), save and reload.

Run: python examples/06_transfer_learning.py [WORKDIR]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import torchkeep as tk


def backbone() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 16))


class Pretrained(nn.Module):
    """The "pre-trained" network: a backbone and a 10-class classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = backbone()
        self.classifier = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.backbone(x)))


class FineTuned(nn.Module):
    """The same backbone with a new 3-class head."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = backbone()
        self.head = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.backbone(x)))


def fit(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


def in_optimizer(opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> bool:
    ids = {id(p) for group in opt.param_groups for p in group["params"]}
    return all(id(p) in ids for p in params)


def main(workdir: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    print("== a pre-trained backbone, saved")
    pretrained = Pretrained()
    loss = fit(
        pretrained, torch.optim.Adam(pretrained.parameters(), lr=1e-2), x, x[:, 0].long() % 10
    )
    tk.save(pretrained.state_dict(), workdir / "pretrained.safetensors", metadata={"classes": 10})
    print(f"pre-trained on 10 classes, loss {loss:.3f}")

    print("== a new head: missing and unexpected keys")
    model = FineTuned()
    try:
        model.load_state_dict(tk.load(workdir / "pretrained.safetensors"))
    except RuntimeError as err:
        print(f"plain load_state_dict: RuntimeError: {str(err).splitlines()[0]}")
    report = tk.load_into(model, workdir / "pretrained.safetensors", strict=False)
    print(report)
    print(f"missing (new, freshly initialised): {report.missing}")
    print(f"unexpected (the old classifier, ignored): {report.unexpected}")

    print("== phase 1: backbone frozen, head trained")
    frozen = tk.freeze(model, "backbone.*")
    print(f"frozen {len(frozen)} parameters: {', '.join(frozen)}")
    groups = tk.trainable_param_groups(model, {"head.*": 1e-2}, weight_decay=0.01)
    opt = torch.optim.AdamW(groups, lr=1e-3)
    print(f"optimizer groups: {[(g['lr'], len(g['params'])) for g in opt.param_groups]}")
    model.train()
    model.backbone.eval()  # frozen weights, but BatchNorm would still update its running stats
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    y = (x[:, 1] > 0).long() + (x[:, 2] > 0).long()
    loss = fit(model, opt, x, y)
    unchanged = all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())
    print(
        f"head loss {loss:.3f}; backbone weights and BatchNorm statistics unchanged: {yesno(unchanged)}"
    )
    tk.save(model.state_dict(), workdir / "phase1.safetensors")
    frozen_diff = tk.diff(workdir / "pretrained.safetensors", workdir / "phase1.safetensors")
    print(f"tk.diff(pretrained, phase 1): {frozen_diff.summary}")

    print("== phase 2: backbone unfrozen at a lower learning rate")
    tk.unfreeze(model, "backbone.*")
    backbone_params = list(model.backbone.parameters())
    print(f"after unfreeze, backbone in the optimizer: {yesno(in_optimizer(opt, backbone_params))}")
    opt.add_param_group({"params": backbone_params, "lr": 1e-4, "weight_decay": 0.01})
    print(
        f"after add_param_group, backbone in the optimizer: {yesno(in_optimizer(opt, backbone_params))}"
    )
    model.train()
    loss = fit(model, opt, x, y)
    moved = not torch.equal(before["0.weight"], model.backbone[0].weight)
    print(f"fine-tuned end to end, loss {loss:.3f}; backbone moved: {yesno(moved)}")

    print("== save, reload, predict")
    tk.save(
        {"model": model.state_dict(), "optimizer": opt.state_dict()}, workdir / "ft.safetensors"
    )
    reloaded = FineTuned()
    report = tk.load_into(reloaded, workdir / "ft.safetensors")
    print(report)
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        same = torch.equal(model(x), reloaded(x))
    print(f"reloaded fine-tuned model: predictions identical: {yesno(same)}")


def yesno(flag: bool) -> str:
    return "yes" if flag else "NO"


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
