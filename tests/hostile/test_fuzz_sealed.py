"""Fuzzing behind the seals: sealed single-file headers and sealed manifests with hostile values.

Each example takes a real torchkeep file (or run checkpoint) holding one of every kind of value,
replaces or deletes one value anywhere in its header or manifest (tensor entries, the skeleton,
raw dtypes, views, hashes, versions, metrics...) with a hostile one, seals it again as the writer
does, and runs every decode entry point. Each must return or raise a TorchkeepError subclass:
an ``OverflowError``, ``ValueError``, ``MemoryError`` or a crash fails the test. The same
mutations run under atheris in ``test_atheris.py``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import torchkeep as tk

from ._fuzzing import (
    HOSTILE_ATOMS,
    file_entry_points,
    hostile_choices,
    outcome,
    paths,
    read_file,
    replaced,
    rich_state,
    run_entry_points,
    write_sealed_file,
    write_sealed_manifest,
)

_atoms = st.sampled_from(HOSTILE_ATOMS) | st.integers() | st.floats(allow_nan=False)
_hostile = st.recursive(
    _atoms | st.text(max_size=6),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(["$", "v", "k", "view", "dtype", "shape"]), children)
        | st.fixed_dictionaries(
            {"$": st.sampled_from(["tensor", "np", "float", "complex", "size", "dict", "view"])},
            optional={"v": children, "k": children, "dtype": children, "items": children},
        )
    ),
    max_leaves=6,
)
_fuzz = settings(
    # TORCHKEEP_FUZZ_EXAMPLES=5000 for a long run; CI runs the default
    max_examples=int(os.environ.get("TORCHKEEP_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def base_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any, bytes]:
    path = tmp_path_factory.mktemp("base") / "rich.safetensors"
    tk.save(rich_state(), path, metadata={"m": [1, {"x": None}]})
    entries, doc, data = read_file(path)
    return path, entries, doc, data


def _draw_mutation(data: st.DataObject, tree: Any) -> tuple[tuple[Any, ...], Any]:
    """A path in ``tree`` and a hostile value for it (of the same kind, mostly), or ``...``."""
    where = data.draw(st.sampled_from(paths(tree)[1:]), label="path")
    original = tree
    for k in where:
        original = original[k]
    like = st.sampled_from(hostile_choices(original))
    value = data.draw(st.one_of(like, like, like, _hostile, st.just(...)), label="value")
    return where, value


@_fuzz
@given(data=st.data())
def test_sealed_headers_fail_only_with_torchkeep_errors(
    base_file: tuple[Path, Any, Any, bytes], data: st.DataObject
) -> None:
    path, entries, doc, raw = base_file
    tree = {"entries": entries, "doc": doc}
    mutated = replaced(tree, *_draw_mutation(data, tree))
    target = path.with_name("fuzzed.safetensors")
    write_sealed_file(target, mutated.get("entries"), mutated.get("doc"), raw)
    for name, call in file_entry_points(target).items():
        event(f"{name}: {outcome(call)}")
    assert tk.verify(target) is not None  # reports, never raises


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    import json

    run = tmp_path_factory.mktemp("run") / "run"
    with tk.CheckpointManager(run, monitor="loss", mode="min") as mgr:
        mgr.save(1, rich_state(), metrics={"loss": 0.5})
    manifest = run / "checkpoints" / "0000000001.json"
    doc = json.loads(manifest.read_bytes())
    doc.pop("digest")
    return run, doc


@_fuzz
@given(data=st.data())
def test_sealed_manifests_fail_only_with_torchkeep_errors(
    base_run: tuple[Path, Any], data: st.DataObject
) -> None:
    run, doc = base_run
    mutation = _draw_mutation(data, doc)
    manifest = run / "checkpoints" / "0000000001.json"
    original = manifest.read_bytes()
    try:
        write_sealed_manifest(manifest, replaced(doc, *mutation))
        for name, call in run_entry_points(run, 1).items():
            event(f"{name}: {outcome(call)}")
        assert tk.verify(run) is not None
    finally:
        manifest.write_bytes(original)


def test_the_base_documents_load(
    base_file: tuple[Path, Any, Any, bytes], base_run: tuple[Path, Any]
) -> None:
    # the fuzzers start from documents that decode, so a refusal is the mutation's doing
    path, entries, doc, raw = base_file
    target = path.with_name("resealed.safetensors")
    write_sealed_file(target, entries, doc, raw)
    assert all(outcome(call) == "ok" for call in file_entry_points(target).values())
    run, _ = base_run
    assert all(outcome(call) == "ok" for call in run_entry_points(run, 1).values())
    assert torch.equal(tk.load(target)["f"], torch.arange(8, dtype=torch.float32))
