"""A URL no store serves is refused with a StorageError by every entry that takes a path, and is
never written as a local folder; ``file://`` names a local path."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep as tk
from torchkeep.storage import is_url, local_path

# Schemes no installed fsspec backend serves (gcsfs is not a dependency).
URLS = ("nosuch://bucket/run", "zz9://x") + (
    ("gs://bucket/x.safetensors",) if importlib.util.find_spec("gcsfs") is None else ()
)

ENTRIES: dict[str, Callable[[str], Any]] = {
    "save": lambda u: tk.save({"w": torch.zeros(2)}, u),
    "load": lambda u: tk.load(u),
    "inspect": lambda u: tk.inspect(u),
    "load_into": lambda u: tk.load_into(nn.Linear(2, 2), u),
    "save_model": lambda u: tk.save_model(nn.Linear(2, 2), u, config={}),
    "load_model": lambda u: tk.load_model(u),
    "convert source": lambda u: tk.convert(u, "out.safetensors"),
    "convert destination": lambda u: tk.convert("in.safetensors", u + ".safetensors"),
    "verify": lambda u: tk.verify(u),
    "scan": lambda u: tk.scan(u),
    "diff": lambda u: tk.diff(u, u),
    "export": lambda u: tk.export(nn.Linear(2, 2), torch.zeros(1, 2), u + ".pt2"),
    "export from": lambda u: tk.export(u, torch.zeros(1, 2), "out.pt2"),
    "CheckpointManager": lambda u: tk.CheckpointManager(u),
    "CheckpointManager read-only": lambda u: tk.CheckpointManager(u, read_only=True),
    "run reference": lambda u: tk.load(u + "@best"),
}


@pytest.mark.parametrize("entry", sorted(ENTRIES))
def test_every_entry_refuses_urls_and_writes_nothing(
    entry: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    tk.save({"w": torch.zeros(2)}, "in.safetensors")
    for url in URLS:
        with pytest.raises(tk.StorageError, match="no (storage|filesystem) for") as caught:
            ENTRIES[entry](url)
        assert caught.value.path is not None and caught.value.path.startswith(url), entry
        assert caught.value.hint
    # `Path("s3://bucket/run")` is `s3:/bucket/run`: nothing of the kind may appear.
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors"]


def test_the_messages_say_what_to_do() -> None:
    with pytest.raises(tk.StorageError) as remote:
        local_path("nosuch://bucket/run")
    assert "no storage for nosuch:// URLs" in str(remote.value)
    assert "torchkeep[remote]" in (remote.value.hint or "")


def test_file_urls_are_local_paths() -> None:
    assert local_path("file:///data/my%20model.pt") == Path("/data/my model.pt")
    assert type(local_path("file:///data/x")) is type(Path("/data/x"))


def test_local_paths_pass_unchanged() -> None:
    for text in ("model.pt", "runs/x@best", "/abs/x:y", "C:/weights.pt", "a://b"[1:]):
        assert not is_url(text)
        assert local_path(text) == Path(text)
    assert local_path(Path("s3:/x")) == Path("s3:/x")  # a Path is already local
    assert is_url("S3://bucket") and is_url("memory://x")
