"""``load_model`` imports nothing that a file names unless the caller allows it.

A model description (``torchkeep_model.json``, a run manifest's ``models``) names the class to
rebuild as ``module:QualName``. Importing a module runs its code, and any installed module will
do, so the module must be already imported, allowed with ``allow_import=``, or bypassed with
``model_class=``; otherwise ``ModelClassError`` is raised before anything is imported.
"""

from __future__ import annotations

import json
import secrets
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import torchkeep as tk

_MODULE = """
import pathlib
import torch
import torchkeep

pathlib.Path({canary!r}).write_text("imported")


@torchkeep.capture_config
class Net(torch.nn.Module):
    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(width, 2)
"""


class Package:
    """A package ``pkg`` on ``sys.path`` whose ``pkg.models`` records its import in a file."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.name = f"tkgate_{secrets.token_hex(4)}"
        self.canary = root / "CANARY"
        package = root / "site" / self.name
        package.mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "models.py").write_text(_MODULE.format(canary=str(self.canary)))
        monkeypatch.syspath_prepend(str(root / "site"))
        self._monkeypatch = monkeypatch

    @property
    def module(self) -> str:
        return f"{self.name}.models"

    def net(self, width: int = 3) -> torch.nn.Module:
        """An instance of ``pkg.models.Net``; the package is imported for it."""
        import importlib

        cls: Any = importlib.import_module(self.module).Net
        return cls(width=width)  # type: ignore[no-any-return]

    def forget(self) -> None:
        """Unimport the package (as in a fresh process) and remove the canary."""
        for name in [n for n in sys.modules if n == self.name or n.startswith(self.name + ".")]:
            self._monkeypatch.delitem(sys.modules, name)
        self.canary.unlink(missing_ok=True)

    @property
    def imported(self) -> bool:
        return self.canary.exists() or self.module in sys.modules


def _reseal(path: Path, doc: dict[str, Any]) -> None:
    """Write an edited description sealed again: whoever can edit it can recompute the seal."""
    from torchkeep.format import seal_json

    doc.pop("digest", None)
    path.write_bytes(seal_json(json.dumps(doc).encode()))


@pytest.fixture
def pkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Package:
    return Package(tmp_path, monkeypatch)


def _saved_sources(pkg: Package, tmp_path: Path) -> list[str]:
    """A save_model directory and a run reference, both of ``pkg.models.Net(width=4)``."""
    net = pkg.net(width=4)
    tk.save_model(net, tmp_path / "net")
    with tk.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(0, {"model": net})
    pkg.forget()
    return [str(tmp_path / "net"), f"{tmp_path / 'run'}@0"]


def test_a_module_named_by_a_file_is_not_imported_without_consent(
    pkg: Package, tmp_path: Path
) -> None:
    for source in _saved_sources(pkg, tmp_path):
        with pytest.raises(tk.ModelClassError) as info:
            tk.load_model(source)
        assert not pkg.imported, source  # refused before importing: no code of it ran
        text = str(info.value)
        assert f"{pkg.module}:Net" in text
        assert f"allow_import={pkg.name!r}" in text and "model_class=Net" in text


def test_allow_import_by_package_prefix_or_exact_module(pkg: Package, tmp_path: Path) -> None:
    sources = _saved_sources(pkg, tmp_path)
    for allow in (pkg.name, [pkg.module], (f"{pkg.name}.",)):
        for source in sources:
            pkg.forget()
            model = tk.load_model(source, allow_import=allow)
            assert pkg.imported and type(model).__name__ == "Net"
            assert model.fc.in_features == 4
    pkg.forget()
    with pytest.raises(tk.ModelClassError):  # a prefix counts at a dot, not within a name
        tk.load_model(sources[0], allow_import=pkg.name[:-1])
    with pytest.raises(tk.ModelClassError):  # another module allowed is not this one
        tk.load_model(sources[0], allow_import="json")
    assert not pkg.imported


def test_model_class_builds_the_callers_class_and_imports_nothing(
    pkg: Package, tmp_path: Path
) -> None:
    sources = _saved_sources(pkg, tmp_path)

    @tk.capture_config
    class Net(torch.nn.Module):
        def __init__(self, width: int = 3) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(width, 2)

    for source in sources:
        model = tk.load_model(source, model_class=Net)
        assert type(model) is Net and model.fc.in_features == 4
    assert not pkg.imported
    with pytest.raises(tk.ModelClassError, match="not a torch.nn.Module"):
        tk.load_model(sources[0], model_class=dict)  # type: ignore[arg-type]


def test_an_imported_module_needs_no_consent(pkg: Package, tmp_path: Path) -> None:
    sources = _saved_sources(pkg, tmp_path)
    pkg.net()  # the caller imported it: nothing new runs
    for source in sources:
        assert type(tk.load_model(source)).__name__ == "Net"


def test_an_installed_module_with_import_time_code_is_not_imported(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The red team's case: a description naming ``this`` printed the Zen of Python."""
    assert "this" not in sys.modules
    tk.save_model(torch.nn.Linear(2, 2), tmp_path / "m", config={"in_features": 2})
    description = tmp_path / "m" / "torchkeep_model.json"
    doc = json.loads(description.read_text())
    doc["class"] = "this:Zen"
    _reseal(description, doc)
    with pytest.raises(tk.ModelClassError, match="refusing to import 'this'"):
        tk.load_model(tmp_path / "m")
    assert "this" not in sys.modules
    assert "Beautiful is better" not in capfd.readouterr().out


def test_a_lazy_module_attribute_is_not_triggered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An imported module's ``__getattr__`` (lazy submodules) runs no code for the lookup."""
    import types

    calls: list[str] = []
    lazy = types.ModuleType("tkgate_lazy")

    def __getattr__(name: str) -> Any:
        calls.append(name)
        return torch.nn.Linear

    lazy.__getattr__ = __getattr__  # type: ignore[method-assign]
    monkeypatch.setitem(sys.modules, "tkgate_lazy", lazy)
    tk.save_model(torch.nn.Linear(2, 2), tmp_path / "m", config={"in_features": 2})
    description = tmp_path / "m" / "torchkeep_model.json"
    doc = json.loads(description.read_text())
    doc["class"] = "tkgate_lazy:Linear"
    _reseal(description, doc)
    with pytest.raises(tk.ModelClassError, match="cannot import"):
        tk.load_model(tmp_path / "m")
    assert calls == []


def test_allow_import_rejects_what_is_not_a_module_name(tmp_path: Path) -> None:
    tk.save_model(
        torch.nn.Linear(2, 2), tmp_path / "m", config={"in_features": 2, "out_features": 2}
    )
    with pytest.raises(TypeError, match="allow_import"):
        tk.load_model(tmp_path / "m", allow_import=[""])
