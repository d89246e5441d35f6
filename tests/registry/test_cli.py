"""``torchkeep registry``: every subcommand, as tables and as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

import torchkeep as tk
from torchkeep.cli import app

from ..cli._helpers import run_torchkeep
from ._models import Classifier


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout


def test_registry_commands(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Classifier(8, 64, 3)
    tk.save(model.state_dict(), tmp_path / "a.safetensors")
    with torch.no_grad():
        model.head.bias.add_(1)
    tk.save(model.state_dict(), tmp_path / "b.safetensors")
    reg = str(tmp_path / "models")
    # register and list in a real process: the installed command
    done = run_torchkeep(
        "registry",
        "register",
        reg,
        "clf",
        str(tmp_path / "a.safetensors"),
        "--config",
        '{"lr": 0.001}',
        "--metrics",
        '{"acc": 0.8}',
        "--json",
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["version"] == "1"
    code, out = _invoke(
        "registry",
        "register",
        reg,
        "clf",
        str(tmp_path / "b.safetensors"),
        "--parent",
        "1",
        "--metadata",
        "data=v3,epochs=4",
    )
    assert code == 0 and "registered" in out and "clf@2" in out
    code, out = _invoke("registry", "register", reg, "clf", str(tmp_path / "b.safetensors"))
    assert code == 0 and "already" in out
    code, out = _invoke("registry", "alias", reg, "clf", "production", "2")
    assert code == 0 and "(new) -> 2" in out
    code, out = _invoke("registry", "alias", f"{reg}/clf@1", "production")
    assert code == 0 and "2 -> 1" in out
    code, out = _invoke("registry", "list", reg)
    assert code == 0 and "clf" in out and "production->1" in out
    code, out = _invoke("registry", "list", reg, "clf", "--json")
    assert [v["version"] for v in json.loads(out)] == ["1", "2"]
    code, out = _invoke("registry", "show", f"{reg}/clf@production")
    assert code == 0 and "fingerprint" in out and "acc=0.8" in out and "torch" in out
    code, out = _invoke("registry", "history", reg, "clf", "production", "--json")
    assert [(m["from_version"], m["to_version"]) for m in json.loads(out)] == [
        (None, "2"),
        ("2", "1"),
    ]
    code, out = _invoke("registry", "lineage", reg, "clf", "1")
    assert code == 0 and "clf@2" in out and "descendant" in out
    code, out = _invoke("registry", "compare", reg, "clf", "1", "2", "--json")
    doc = json.loads(out)
    assert [t["name"] for t in doc["tensors"] if not t["identical"]] == ["head.bias"]
    code, out = _invoke("registry", "compare", f"{reg}/clf@1", f"{reg}/clf@2")
    assert code == 0 and "5 identical (frozen), 1 changed" in out
    code, out = _invoke("registry", "export", f"{reg}/clf@2", str(tmp_path / "m.json"))
    assert code == 0 and json.loads((tmp_path / "m.json").read_text())["parent"] == "clf@1"
    code, out = _invoke("registry", "export", reg, "clf", "2", "-o", str(tmp_path / "n.json"))
    assert code == 0 and json.loads((tmp_path / "n.json").read_text())["metadata"] == {
        "data": "v3",
        "epochs": 4,
    }
    code, out = _invoke("registry", "verify", reg)
    assert code == 0 and "2 version(s), 12 tensors checked: ok" in out
    code, out = _invoke("inspect", f"{reg}/clf@production")
    assert code == 0 and "head.bias" in out
    code, out = _invoke("registry", "delete", reg, "clf", "1", "--json")
    assert code == 1 and json.loads(out)["error"] == "RegistryError"
    code, out = _invoke("registry", "delete", f"{reg}/clf@2")
    assert code == 0 and "deleted" in out
    done = run_torchkeep("registry", "show", f"{reg}/clf@2")
    assert done.returncode == 1
    assert done.stderr.startswith("CheckpointNotFoundError:") and "hint:" in done.stderr
