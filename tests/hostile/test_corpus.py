"""A corpus of malicious and malformed files, built here: each is refused, none runs code.

Every file goes through the default loading path (``torchkeep.load``), never with ``trust``.
A canary file that any payload would create must never appear.
"""

from __future__ import annotations

import builtins
import functools
import importlib
import io
import json
import operator
import os
import pickle
import pkgutil
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchkeep as tk
from torchkeep.format._hash import seal_json
from torchkeep.format._run import read_manifest


def gadget(canary: Path) -> dict[str, Any]:
    """Objects whose unpickling would create ``canary`` (or worse), by many routes."""
    cmd = f"touch {canary}"

    class Reduce:
        def __init__(self, fn: Any, args: tuple[Any, ...]) -> None:
            self.fn, self.args = fn, args

        def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
            return (self.fn, self.args)

    return {
        "os.system": Reduce(os.system, (cmd,)),
        "subprocess.Popen": Reduce(subprocess.Popen, (["touch", str(canary)],)),
        "eval": Reduce(builtins.eval, (f"__import__('os').system({cmd!r})",)),
        "exec": Reduce(builtins.exec, (f"import os; os.system({cmd!r})",)),
        "getattr chain": Reduce(
            builtins.getattr, (Reduce(importlib.import_module, ("os",)), "system")
        ),
        "methodcaller": Reduce(operator.methodcaller, ("system", cmd)),
        "partial": Reduce(functools.partial, (os.system, cmd)),
        "resolve_name": Reduce(pkgutil.resolve_name, ("os:system",)),
        "FileIO": Reduce(io.FileIO, (str(canary), "w")),
    }


CASES = list(gadget(Path("/nonexistent")).keys())


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("legacy", [False, True])
def test_malicious_torch_files_are_refused_and_run_nothing(
    tmp_path: Path, name: str, legacy: bool
) -> None:
    canary = tmp_path / "CANARY"
    path = tmp_path / "evil.pt"
    torch.save(
        {"weight": torch.ones(2), "payload": gadget(canary)[name]},
        path,
        _use_new_zipfile_serialization=not legacy,
    )
    with pytest.raises(tk.UnsafeCheckpointError) as err:
        tk.load(path)
    assert err.value.globals, "the refused globals are named"
    with pytest.raises(tk.UnsafeCheckpointError):
        tk.load_into(torch.nn.Linear(2, 2), path)
    assert not tk.scan(path).is_safe
    assert not canary.exists()


@pytest.mark.parametrize("name", CASES)
def test_bare_pickles_renamed_as_checkpoints_are_refused(tmp_path: Path, name: str) -> None:
    canary = tmp_path / "CANARY"
    path = tmp_path / "model.bin"
    path.write_bytes(pickle.dumps(gadget(canary)[name], protocol=2))
    with pytest.raises(tk.TorchkeepError):
        tk.load(path)
    assert not canary.exists()


def test_storage_shorter_than_declared_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "short.pt"
    torch.save({"w": torch.ones(1000)}, path)
    shrunk = tmp_path / "shrunk.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(shrunk, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/data/0"):
                data = data[:100]  # declared 1000 floats, 25 present
            dst.writestr(info, data)
    with pytest.raises(tk.CorruptCheckpointError):
        tk.load(shrunk)


def test_zip_entry_with_path_traversal_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "trav.pt"
    torch.save({"w": torch.ones(2)}, path)
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("../../escaped.txt", "x")
    try:
        out = tk.load(path)
    except tk.CorruptCheckpointError:
        pass  # refusing is fine: nothing may be extracted
    else:  # so is loading the archive's own data, exactly, and nothing else
        assert list(out) == ["w"] and torch.equal(out["w"], torch.ones(2))
    assert not (tmp_path.parent / "escaped.txt").exists()
    assert not (tmp_path / "escaped.txt").exists()


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(
    doc=_json,
    slot=st.sampled_from(
        ["tensors", "skeleton", "step", "time", "packs", "metrics", "metadata", "models", None]
    ),
)
def test_fuzzed_manifests_fail_only_with_torchkeep_errors(
    tmp_path_factory: Any, doc: Any, slot: str | None
) -> None:
    base: dict[str, Any] = {
        "format_version": "1.0",
        "step": 0,
        "time": 0.0,
        "metrics": {},
        "metadata": {},
        "skeleton": {"$": "dict", "v": {}},
        "tensors": {},
        "packs": {},
    }
    if slot is None:
        base = doc if isinstance(doc, dict) else {"x": doc}
    else:
        base[slot] = doc
    path = tmp_path_factory.mktemp("m") / "0000000000.json"
    # Sealed as the writer seals, so that the fuzzed fields reach the checks behind the digest.
    data = json.dumps(base).encode()
    path.write_bytes(seal_json(data) if base else data)
    try:
        manifest = read_manifest(path)
    except tk.CorruptCheckpointError as exc:
        assert str(path) in str(exc)
        return
    # accepted: what comes back is what was written
    assert manifest.step == base["step"] and manifest.time == base.get("time", manifest.time)
    assert manifest.metrics == base.get("metrics", {})
    assert manifest.metadata == base.get("metadata", {})
