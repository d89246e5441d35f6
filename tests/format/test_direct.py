"""The registry of live mappings behind direct reads (``format/_direct.py``)."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

import torchkeep as tk
from torchkeep.format import _direct
from torchkeep.format._safetensors import MappedFile


def test_a_mapping_collected_while_the_registry_is_locked_does_not_deadlock(
    tmp_path: Path,
) -> None:
    """The garbage collector may run a mapping's weakref callback on the thread that holds the
    registry's lock (inside a lookup): the callback must not take the lock. It did, and a
    ``load_model`` in the full suite hung for good."""
    path = tmp_path / "w.safetensors"
    tk.save({"w": torch.arange(4.0)}, path)
    mapped = MappedFile(str(path))
    _direct.track(mapped)
    entry = _direct._LIVE[mapped._addr]
    callback = entry.map.__callback__
    assert callback is not None

    def collected_under_the_lock() -> None:
        with _direct._LOCK:  # as when a collection happens inside _find's critical section
            callback(entry.map)

    worker = threading.Thread(target=collected_under_the_lock, daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "the weakref callback blocked on the registry's lock"
    del mapped
    _direct._find(torch.zeros(1))  # the next lookup purges what was collected
    assert all(e.map() is not None for e in _direct._LIVE.values())
