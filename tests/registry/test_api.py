"""tk.Registry: sources, numbering, records, references, aliases, lineage, compare, delete."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import threading
from pathlib import Path

import pytest
import torch

import torchkeep as tk

from ._models import Classifier, Plain


def _finetune(model: Classifier, seed: int) -> Classifier:
    """A copy whose head changed and whose backbone is frozen (identical bytes)."""
    tuned = Classifier(8, 64, 3)
    tuned.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        tuned.head.weight.add_(torch.randn(tuned.head.weight.shape, generator=g))
    return tuned


@pytest.fixture
def model() -> Classifier:
    torch.manual_seed(0)
    return Classifier(8, 64, 3)


def test_versions_number_themselves_and_take_semantic_versions(tmp_path: Path, model) -> None:
    reg = tk.Registry(tmp_path / "models")
    v1 = reg.register("clf", model)
    v2 = reg.register("clf", _finetune(model, 1), version="1.1.0")
    v3 = reg.register("clf", _finetune(model, 2))
    assert (v1.version, v2.version, v3.version) == ("1", "1.1.0", "3")
    assert [v.number for v in reg.versions("clf")] == [1, 2, 3]
    assert reg.resolve("clf", "latest").version == "3"
    with pytest.raises(tk.RegistryError, match="already has version '1.1.0'"):
        reg.register("clf", _finetune(model, 3), version="1.1.0")
    with pytest.raises(tk.InvalidArgumentError, match="clash"):
        reg.register("clf", _finetune(model, 4), version="7")
    assert [v.version for v in reg.versions("clf")] == ["1", "1.1.0", "3"]  # nothing lost


def test_a_version_records_config_metrics_versions_commit_time(tmp_path: Path, model) -> None:
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(
        [
            "git",
            "-C",
            str(tmp_path),
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            "x",
        ],
        check=True,
    )
    head = subprocess.run(
        ["git", "-C", str(tmp_path), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        v = tk.Registry("models").register(
            "clf",
            model,
            config={"lr": 3e-4},
            metrics={"acc": torch.tensor(0.75)},
            metadata={"data": "v3"},
        )
    finally:
        os.chdir(cwd)
    assert v.config == {"d_in": 8, "hidden": 64, "classes": 3, "lr": 3e-4}
    assert v.metrics == {"acc": 0.75} and v.metadata == {"data": "v3"}
    assert v.system["torch_version"] == str(torch.__version__)
    assert v.system["torchkeep_version"] == tk.__version__
    assert v.system["git_commit"] == head
    assert abs(v.created - __import__("time").time()) < 60
    assert v.fingerprint.startswith("sha256:") and v.tensors == 6
    assert v.model is not None and v.model["class"].endswith("_models:Classifier")


def test_fingerprint_ignores_file_layout_and_order(tmp_path: Path, model) -> None:
    sd = model.state_dict()
    tk.save(sd, tmp_path / "a.safetensors")
    torch.save(sd, tmp_path / "b.pt")
    reversed_sd = dict(reversed(list(sd.items())))
    reg = tk.Registry(tmp_path / "models")
    a = reg.register("a", tmp_path / "a.safetensors")
    b = reg.register("b", str(tmp_path / "b.pt"))
    c = reg.register("c", reversed_sd)
    d = reg.register("d", model)
    assert a.fingerprint == b.fingerprint == c.fingerprint == d.fingerprint
    e = reg.register("e", _finetune(model, 1))
    assert e.fingerprint != a.fingerprint


def test_identical_weights_return_the_existing_version(tmp_path: Path, model) -> None:
    reg = tk.Registry(tmp_path / "models")
    v1 = reg.register("clf", model)
    again = reg.register("clf", model.state_dict())
    assert again.version == "1" and again.duplicate and not v1.duplicate
    forced = reg.register("clf", model, allow_duplicate=True)
    assert forced.version == "2" and forced.fingerprint == v1.fingerprint
    assert len(reg.versions("clf")) == 2


def test_frozen_backbone_is_stored_once(tmp_path: Path, model) -> None:
    reg = tk.Registry(tmp_path / "models")
    packs = tmp_path / "models" / "packs"
    reg.register("clf", model)
    first = sum(p.stat().st_size for p in packs.iterdir())
    for seed in range(1, 4):
        reg.register("clf", _finetune(model, seed), parent=str(seed))
    grown = sum(p.stat().st_size for p in packs.iterdir()) - first
    head = model.head.weight.numel() * 4
    assert grown < 3 * (head + 4096)  # each version wrote its head only (plus a pack header)
    backbone = sum(t.numel() * 4 for k, t in model.state_dict().items() if "backbone" in k)
    assert grown < backbone


def test_get_returns_a_model_or_a_state_dict(tmp_path: Path, model) -> None:
    reg = tk.Registry(tmp_path / "models")
    reg.register("clf", model)
    got = reg.get("clf", "1")
    assert isinstance(got, Classifier) and not got.training
    x = torch.randn(2, 8)
    torch.testing.assert_close(got(x), model.eval()(x))
    reg.register("plain", Plain(4))
    sd = reg.get("plain", "latest")
    assert isinstance(sd, dict) and set(sd) == {"fc.weight", "fc.bias"}
    reg.register("plain2", Plain(4), config={"width": 4})  # accepted by the constructor
    assert isinstance(reg.get("plain2", "1"), Plain)
    reg.register("plain3", Plain(4), config={"lr": 0.1})  # hyperparameters only: weights
    assert isinstance(reg.get("plain3", "1"), dict)


def test_run_reference_source_brings_metrics_and_history(tmp_path: Path, model) -> None:
    run = tmp_path / "runs" / "exp"
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with tk.CheckpointManager(run, monitor="val_loss") as mgr:
        for step, loss in ((1, 0.9), (2, 0.4), (3, 0.6)):
            with torch.no_grad():
                model.head.bias.add_(step)
            mgr.save(step, {"model": model, "optimizer": opt}, metrics={"val_loss": loss})
    reg = tk.Registry(tmp_path / "models")
    v = reg.register("clf", f"{run}@best")
    assert v.metrics["val_loss"] == 0.4 and v.metrics["step"] == 2
    assert [r["step"] for r in v.history] == [1, 2]
    assert v.config == {"d_in": 8, "hidden": 64, "classes": 3}
    got = reg.get("clf", v.version)
    assert isinstance(got, Classifier)
    best = tk.load(f"{run}@best")["model"]
    assert torch.equal(got.head.bias, best["head.bias"])


def test_references_work_wherever_a_checkpoint_reference_does(tmp_path: Path, model) -> None:
    reg = tk.Registry(tmp_path / "models")
    reg.register("clf", model)
    reg.register("clf", _finetune(model, 1))
    reg.set_alias("clf", "production", "2")
    ref, old = f"{tmp_path}/models/clf@production", f"{tmp_path}/models/clf@1"
    sd = tk.load(ref)
    assert set(sd) == set(model.state_dict())
    fresh = Classifier(8, 64, 3)
    report = tk.load_into(fresh, ref)
    assert len(report.loaded) == 6
    assert torch.equal(fresh.head.weight, sd["head.weight"])
    assert isinstance(tk.load_model(ref), Classifier)
    info = tk.inspect(ref)
    assert info.format == "torchkeep-registry" and len(info.tensors) == 6
    assert info.metadata["aliases"] == ["production"]
    diff = tk.diff(old, ref)
    assert [d.key for d in diff.changed] == ["head.weight"]
    assert tk.verify(ref).ok
    whole = tk.verify(tmp_path / "models")  # a registry folder: every version
    assert whole.ok and whole.kind == "registry" and len(whole.files) == 2
    assert tk.load(f"{tmp_path}/models/clf")["head.weight"].equal(sd["head.weight"])  # latest
    out = tmp_path / "clf.pt2"
    tk.export(ref, (torch.randn(2, 8),), out)
    assert out.is_file()


def test_alias_moves_keep_a_history(tmp_path: Path, model) -> None:
    reg = tk.Registry(tmp_path / "models")
    for seed in range(3):
        reg.register("clf", _finetune(model, seed))
    reg.set_alias("clf", "staging", "1")
    reg.set_alias("clf", "production", "staging")  # an alias resolves to its version
    reg.set_alias("clf", "staging", "3")
    reg.set_alias("clf", "production", "2")
    moves = reg.alias_history("clf", "production")
    assert [(m.from_version, m.to_version) for m in moves] == [(None, "1"), ("1", "2")]
    assert all(m.user and m.host and m.pid == os.getpid() for m in moves)
    assert moves[0].time <= moves[1].time
    assert reg.resolve("clf", "production").aliases == ("production",)
    reg.set_alias("clf", "production", None)
    assert reg.alias_history("clf", "production")[-1].to_version is None
    assert "production" not in reg.aliases("clf")


def test_lineage_compare_and_export_metadata(tmp_path: Path, model) -> None:
    reg = tk.Registry(tmp_path / "models")
    base = reg.register("clf", model)
    child = reg.register("clf", _finetune(model, 1), parent=base)
    other = reg.register("distilled", Plain(4), parent="clf@2")
    lin = reg.lineage("clf", "2")
    assert [v.version for v in lin.ancestors] == ["1"]
    assert [(v.name, v.version) for v in lin.descendants] == [("distilled", "1")]
    assert [v.version for v in reg.lineage("distilled", "1").ancestors] == ["2", "1"]
    assert [v.version for v in reg.lineage("clf", "1").descendants] == ["2", "1"]
    assert child.parent == "clf@1" and other.parent == "clf@2"
    c = reg.compare("clf", "1", "2")
    assert set(c.identical) == {k for k in model.state_dict() if k != "head.weight"}
    (head,) = [t for t in c.tensors if not t.identical]
    a, b = model.head.weight.double(), reg.get("clf", "2").head.weight.double()
    assert head.relative_l2 == pytest.approx(((b - a).norm() / a.norm()).item())
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
    assert head.cosine == pytest.approx(cos) and head.changed == 1.0
    path = reg.export_metadata("clf", "2", tmp_path / "clf-2.json")
    doc = json.loads(path.read_text())
    assert doc["fingerprint"] == child.fingerprint and doc["parent"] == "clf@1"
    assert doc["tensor_table"]["head.weight"]["shape"] == [3, 64]
    assert doc["system"]["torch_version"] == str(torch.__version__)


def test_delete_keeps_other_versions_and_refuses_aliased_ones(tmp_path: Path, model) -> None:
    reg = tk.Registry(tmp_path / "models")
    reg.register("clf", model)
    reg.register("clf", _finetune(model, 1))
    reg.register("clf", _finetune(model, 2))
    reg.set_alias("clf", "production", "2")
    with pytest.raises(tk.RegistryError, match="aliased as production"):
        reg.delete("clf", "2")
    reg.delete("clf", "1")  # its backbone is v2's and v3's too
    packs = tmp_path / "models" / "packs"
    assert len(list(packs.iterdir())) == 3  # v1's pack holds the shared backbone
    reg.delete("clf", "3")
    assert len(list(packs.iterdir())) == 2  # v3's head pack went
    assert reg.verify().ok and reg.verify().versions == 1
    assert isinstance(reg.get("clf", "production"), Classifier)
    assert [v.version for v in reg.versions("clf")] == ["2"]
    assert reg.register("clf", _finetune(model, 9)).number == 4  # numbers are never reused
    db = sqlite3.connect(tmp_path / "models" / "index.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_threads_share_one_registry(tmp_path: Path) -> None:
    reg = tk.Registry(tmp_path / "models")
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for i in range(5):
                reg.register("clf", {"w": torch.full((8,), float(seed * 10 + i))})
                reg.set_alias("clf", "staging", "1")
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [v.number for v in reg.versions("clf")] == list(range(1, 21))
    assert len(reg.alias_history("clf", "staging")) == 20
    reg.close()
