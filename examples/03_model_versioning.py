"""Tutorial chapter 3, model versioning, the torchkeep way.

The classic tutorial builds a ``VersionedModel`` by hand: a version number, the config and
hyperparameters, a fingerprint, the training history and integrity checks in a JSON file beside a
``torch.save``. ``tk.Registry`` keeps all of that in one folder any process can share (SQLite
index, content-addressed tensors): versions that number themselves, a fingerprint over tensor
names, dtypes, shapes and bytes, the config and metrics, lineage, aliases with their history,
JSON metadata, and ``verify``, which recomputes every hash.

Run: python examples/03_model_versioning.py [WORKDIR]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import torchkeep as tk


@tk.capture_config  # the registry records the config, so get() rebuilds the model itself
class Classifier(nn.Module):
    def __init__(self, width: int = 32, classes: int = 3) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, width), nn.ReLU())
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, steps: int) -> float:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


def main(workdir: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    registry = tk.Registry(workdir / "models")

    print("== versions, config, hyperparameters, metrics")
    model = Classifier()
    loss = fit(model, x, y, lr=1e-2, steps=40)
    v1 = registry.register(
        "classifier",
        model,
        config={"lr": 1e-2, "steps": 40, "width": 32},
        metrics={"train_loss": loss},
        metadata={"note": "baseline"},
    )
    print(f"registered classifier version {v1.version}, fingerprint {v1.fingerprint}")

    tk.freeze(model, "backbone.*")  # fine-tune the head only: the backbone is stored once
    loss = fit(model, x, y, lr=5e-3, steps=40)
    v2 = registry.register(
        "classifier",
        model,
        config={"lr": 5e-3, "steps": 40, "width": 32, "frozen": "backbone.*"},
        metrics={"train_loss": loss},
        parent=v1.version,
    )
    print(f"registered classifier version {v2.version} (parent {v1.version})")

    # The same weights once more, from a torch.save file: the fingerprint ignores the layout.
    torch.save(model.state_dict(), workdir / "classifier.pt")
    again = registry.register("classifier", workdir / "classifier.pt")
    print(
        f"registering identical weights returns version {again.version} "
        f"(duplicate: {again.duplicate})"
    )

    print("== history and lineage")
    for record in registry.versions("classifier"):
        print(
            f"  version {record.version}: parent {record.parent}, config {record.config}, "
            f"metrics {record.metrics}, torch {record.system.get('torch_version')}"
        )
    lineage = registry.lineage("classifier", v1.version)
    print(
        f"lineage of version {v1.version}: descendants {[d.version for d in lineage.descendants]}"
    )

    print("== aliases")
    registry.set_alias("classifier", "production", v1.version)
    registry.set_alias("classifier", "production", v2.version)  # promote the fine-tune
    for move in registry.alias_history("classifier", "production"):
        print(f"  production: {move.from_version} -> {move.to_version} by {move.user}")
    production = registry.get("classifier", "production")
    assert isinstance(production, nn.Module)
    production.eval()
    model.eval()
    with torch.no_grad():
        same = torch.equal(production(x), model(x))
    print(f"get('classifier', 'production') predictions identical: {'yes' if same else 'NO'}")
    by_reference = tk.load(workdir / "models" / "classifier@production")
    print(f"tk.load('models/classifier@production'): {len(by_reference)} entries")

    print("== compare, integrity, JSON metadata")
    comparison = registry.compare("classifier", v1.version, v2.version)
    print(f"identical in versions 1 and 2 (frozen): {', '.join(comparison.identical)}")
    for t in comparison.tensors:
        if not t.identical:
            print(f"  changed {t.name}: relative L2 {t.relative_l2:.3f}, cosine {t.cosine:.3f}")
    report = registry.verify("classifier", v2.version)
    print(f"verify version {v2.version}: {'ok' if report.ok else report.problems}")
    registry.export_metadata("classifier", v2.version, workdir / "classifier-v2.json")
    exported = json.loads((workdir / "classifier-v2.json").read_text())
    print(f"metadata JSON keys: {sorted(exported)}")
    print(
        f"metadata JSON fingerprint matches: {'yes' if v2.fingerprint in json.dumps(exported) else 'NO'}"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
