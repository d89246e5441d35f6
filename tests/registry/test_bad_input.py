"""Bad input to the registry: a clear TorchkeepError naming what is wrong and the way out."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import torchkeep as tk


@pytest.fixture
def reg(tmp_path: Path) -> tk.Registry:
    r = tk.Registry(tmp_path / "models")
    r.register("clf", {"w": torch.arange(40000.0), "b": torch.ones(3)})
    r.register("clf", {"w": torch.arange(40000.0), "b": torch.zeros(3)})
    r.set_alias("clf", "production", "2")
    return r


def test_unknown_name_version_or_alias(reg: tk.Registry) -> None:
    with pytest.raises(tk.CheckpointNotFoundError, match="no model named 'nope'") as e:
        reg.get("nope", "1")
    assert "clf" in (e.value.hint or "")
    with pytest.raises(tk.CheckpointNotFoundError, match="no version or alias '9'") as e:
        reg.get("clf", "9")
    assert "production" in (e.value.hint or "") and "1, 2" in (e.value.hint or "")
    with pytest.raises(tk.CheckpointNotFoundError, match="'staging'"):
        tk.load(f"{reg.root}/clf@staging")
    with pytest.raises(tk.CheckpointNotFoundError):
        reg.alias_history("clf", "staging")
    with pytest.raises(tk.CheckpointNotFoundError):
        reg.set_alias("clf", "staging", "7")
    with pytest.raises(tk.CheckpointNotFoundError):
        reg.register("clf", {"w": torch.ones(2)}, parent="41")
    with pytest.raises(tk.CheckpointNotFoundError):
        reg.delete("clf", "5")
    assert [v.version for v in reg.versions("clf")] == ["1", "2"]  # nothing changed


def test_invalid_names_and_sources(reg: tk.Registry, tmp_path: Path) -> None:
    with pytest.raises(tk.InvalidArgumentError, match="model name"):
        reg.register("../evil", {"w": torch.ones(2)})
    with pytest.raises(tk.InvalidArgumentError, match="alias"):
        reg.set_alias("clf", "3", "1")
    with pytest.raises(tk.UnsupportedValueError, match="holds no tensor"):
        reg.register("clf", {"lr": 0.1})
    with pytest.raises(tk.UnsupportedValueError, match="cannot register a int"):
        reg.register("clf", 3)
    with pytest.raises(tk.CheckpointNotFoundError):
        reg.register("clf", tmp_path / "missing.safetensors")
    (tmp_path / "file").write_text("x")
    with pytest.raises(tk.InvalidArgumentError, match="not a folder"):
        tk.Registry(tmp_path / "file")


def test_a_corrupted_pack_is_reported_and_refused(reg: tk.Registry) -> None:
    v1 = reg.resolve("clf", "1")
    pack = next(r.pack for r in reg.manifest(v1).tensors.values() if r.key == "w")
    path = reg.root / "packs" / pack
    data = bytearray(path.read_bytes())
    data[-1000] ^= 0xFF  # inside tensor w's bytes, shared by both versions
    path.write_bytes(bytes(data))
    with pytest.raises(tk.CorruptCheckpointError, match="does not match its hash"):
        reg.get("clf", "1")
    with pytest.raises(tk.CorruptCheckpointError):
        tk.load(f"{reg.root}/clf@production")
    report = reg.verify()
    assert not report.ok
    assert any("clf@1" in p and "'w'" in p for p in report.problems)
    assert any("clf@2" in p and "'w'" in p for p in report.problems)
    assert not tk.verify(f"{reg.root}/clf@1").ok
    whole = tk.verify(reg.root)
    assert not whole.ok and whole.damaged == 2


def test_a_missing_pack_is_reported(reg: tk.Registry) -> None:
    for p in (reg.root / "packs").iterdir():
        p.unlink()
    with pytest.raises(tk.CorruptCheckpointError, match="missing"):
        reg.get("clf", "2")
    problems = reg.verify("clf").problems
    assert len(problems) == 4 and all("missing" in p for p in problems)


def test_a_damaged_index_is_refused(tmp_path: Path) -> None:
    tk.Registry(tmp_path / "models").close()
    (tmp_path / "models" / "index.sqlite").write_bytes(b"not a database" * 100)
    for name in ("index.sqlite-wal", "index.sqlite-shm"):
        (tmp_path / "models" / name).unlink(missing_ok=True)
    with pytest.raises(tk.CorruptCheckpointError, match="not a SQLite database"):
        tk.Registry(tmp_path / "models")
    with pytest.raises(tk.CorruptCheckpointError, match="not a SQLite database"):
        tk.load(f"{tmp_path}/models/clf@1")
