"""The registry of readers: one reader per format, and every verb starts from it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import torchkeep as tk
from torchkeep.format import READERS, DirectorySource, Format, RunSource, open_source
from torchkeep.format._readers import SafetensorsSource, TorchSource


def test_every_format_has_exactly_one_reader() -> None:
    """Adding a format means one registration: the registry names each Format once."""
    assert sorted(READERS) == sorted(Format)
    for fmt, reader in READERS.items():
        # TORCHKEEP files are safetensors, told apart by their header: the same reader.
        assert reader.format is (Format.SAFETENSORS if fmt is Format.TORCHKEEP else fmt)


def test_references_open_the_reader_of_their_kind(tmp_path: Path) -> None:
    state = nn.Linear(2, 2).state_dict()
    tk.save(state, tmp_path / "w.safetensors")
    tk.save(state, tmp_path / "w.pt")
    with tk.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, {"model": nn.Linear(2, 2)})
    trainer = tmp_path / "checkpoint-1"
    trainer.mkdir()
    tk.save(state, trainer / "optimizer.pt")
    assert isinstance(open_source(tmp_path / "w.safetensors"), SafetensorsSource)
    assert isinstance(open_source(tmp_path / "w.pt"), TorchSource)
    assert isinstance(open_source(f"{tmp_path / 'run'}@latest"), RunSource)
    assert isinstance(open_source(trainer), DirectorySource)
    loaded = open_source(tmp_path / "w.safetensors").load()
    assert torch.equal(loaded["weight"], state["weight"])


def test_a_missing_reference_is_not_found_for_every_verb(tmp_path: Path) -> None:
    for verb in (tk.load, tk.inspect, tk.scan):
        with pytest.raises(tk.CheckpointNotFoundError):
            verb(tmp_path / "nothing.safetensors")
    assert not tk.verify(tmp_path / "nothing.safetensors").ok
