"""A run directory never reaches outside itself: no link below its root is followed, and the sweep
deletes only files the run wrote."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import torchkeep as tk
from torchkeep.format import RunReader, load_reference


def make_run(root: Path, steps: int = 2) -> Path:
    run = root / "run"
    model = torch.nn.Linear(8, 8)
    with tk.CheckpointManager(run, keep_last=5, monitor="loss") as mgr:
        for step in range(steps):
            model.weight.data.add_(1.0)
            mgr.save(step, {"model": model, "step": step}, metrics={"loss": 1.0 / (step + 1)})
    return run


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (links not followed) with a hash of its bytes."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(folder))] = f"link -> {p.readlink()}"
        elif p.is_file():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def users_folder(root: Path, run: Path) -> Path:
    """A folder of the user's own files, some of them named and shaped like a run's packs."""
    folder = root / "users_folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    (folder / "0000000007-0badc0de.safetensors").write_bytes(b"my own file, named like a pack")
    pack = sorted((run / "packs").iterdir())[0]
    (folder / "0000000008-0badcafe.safetensors").write_bytes(pack.read_bytes())  # a real pack
    tk.save({"w": torch.ones(3)}, folder / "0000000009-00c0ffee.safetensors")
    return folder


def link_folder(run: Path, name: str, target: Path) -> None:
    """Replace ``run/name`` by a link to ``target`` holding a copy of the folder's files."""
    for p in (run / name).iterdir():
        shutil.copy2(p, target / p.name)
    shutil.rmtree(run / name)
    (run / name).symlink_to(target, target_is_directory=True)


def test_opening_a_run_with_packs_linked_to_a_users_folder_deletes_nothing(
    tmp_path: Path,
) -> None:
    run = make_run(tmp_path)
    folder = users_folder(tmp_path, run)
    link_folder(run, "packs", folder)
    before = snapshot(folder)
    with pytest.raises(tk.CorruptCheckpointError, match="packs is a symbolic link") as info:
        tk.CheckpointManager(run).close()
    assert "real folder" in str(info.value)  # the way out
    with pytest.raises(tk.CorruptCheckpointError, match="packs is a symbolic link"):
        tk.CheckpointManager(run, read_only=True)
    assert snapshot(folder) == before  # not one file of the user's folder deleted or changed


@pytest.mark.parametrize("name", ["packs", "checkpoints"])
def test_readers_never_follow_a_linked_folder_out_of_the_run(tmp_path: Path, name: str) -> None:
    run = make_run(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    link_folder(run, name, outside)
    for read in (
        lambda: tk.load(f"{run}@latest"),
        lambda: tk.load(f"{run}@best"),
        lambda: tk.load(f"{run}@1"),
        lambda: tk.load_into(torch.nn.Linear(8, 8), f"{run}@latest"),
        lambda: tk.inspect(f"{run}@latest"),
    ):
        with pytest.raises(tk.CorruptCheckpointError, match=f"{name} is a symbolic link"):
            read()
    report = tk.verify(run)
    assert not report.ok and f"{name} is a symbolic link" in report.problems[0]


@pytest.mark.parametrize("name", ["torchkeep_run.json", "metrics.jsonl", ".lock"])
def test_a_linked_file_of_the_run_is_refused_and_left_untouched(tmp_path: Path, name: str) -> None:
    run = make_run(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / name
    target.write_bytes((run / name).read_bytes() if (run / name).stat().st_size else b"user data")
    (run / name).unlink()
    (run / name).symlink_to(target)
    before = snapshot(outside)
    # Opening would truncate a linked .lock, a save append to a linked metrics.jsonl.
    with (
        pytest.raises(tk.CorruptCheckpointError, match="is a symbolic link"),
        tk.CheckpointManager(run) as mgr,
    ):
        mgr.save(5, {"step": 5}, metrics={"loss": 0.0})
    with pytest.raises(tk.CorruptCheckpointError, match="is a symbolic link"):
        tk.load(f"{run}@latest")
    assert snapshot(outside) == before


def test_the_sweep_deletes_only_packs_the_run_wrote(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    packs = run / "packs"
    real = sorted(packs.iterdir())[0].read_bytes()
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(real)
    (packs / "0000000007-0badc0de.safetensors").write_bytes(b"not a pack, named like one")
    tk.save({"w": torch.ones(3)}, packs / "0000000009-00c0ffee.safetensors")  # no pack header
    (packs / "0000000010-0badf00d.safetensors").symlink_to(outside)
    (packs / "notes.safetensors").write_bytes(real)  # a pack's bytes, not a pack's name
    (packs / "0000000008-0badcafe.safetensors").write_bytes(real)  # an orphaned pack: swept
    kept = snapshot(packs)
    del kept["0000000008-0badcafe.safetensors"]
    with tk.CheckpointManager(run):
        pass
    assert snapshot(packs) == kept
    assert outside.read_bytes() == real
    assert tk.verify(run).ok  # the strangers are noted, not damage


def test_packs_written_before_the_pack_marker_are_still_swept(tmp_path: Path) -> None:
    from torchkeep.format._artifact import _write_sealed, write_pack

    run = make_run(tmp_path)
    tensors = {"t": torch.arange(4.0)}
    with open(run / "packs" / "0000000003-0ddba11a.safetensors", "wb") as f:
        write_pack(f, tensors)
    marked = (run / "packs" / "0000000003-0ddba11a.safetensors").read_bytes()
    header = json.loads(marked[8 : 8 + int.from_bytes(marked[:8], "little")])
    document = json.loads(header["__metadata__"]["torchkeep"])
    assert document.pop("kind") == "torchkeep-pack"
    with open(run / "packs" / "0000000004-0ddba11b.safetensors", "wb") as f:
        _write_sealed(f, tensors, document)  # a pack as torchkeep 0.1.0 wrote it
    with tk.CheckpointManager(run):
        pass
    assert sorted(p.name[:10] for p in (run / "packs").iterdir()) == ["0000000000", "0000000001"]


def test_a_folder_swapped_for_a_link_after_opening_stops_the_writer(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    folder = users_folder(tmp_path, run)
    with tk.CheckpointManager(run) as mgr:
        link_folder(run, "packs", folder)
        before = snapshot(folder)
        with pytest.raises(tk.CorruptCheckpointError, match="packs is a symbolic link"):
            mgr.save(2, {"w": torch.full((8,), 2.0)})
    assert snapshot(folder) == before


def test_a_pack_deleted_by_hand_is_damage_not_a_prune(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    manifest = RunReader(run).manifest(1)
    for name in manifest.packs:
        (run / "packs" / name).unlink()
    with pytest.raises(tk.CorruptCheckpointError, match="is missing") as info:
        tk.load(f"{run}@1")
    assert not isinstance(info.value, tk.CheckpointPrunedError)
    with pytest.raises(tk.CorruptCheckpointError, match="is missing"):
        tk.load(f"{run}@latest")
    report = tk.verify(run)
    assert not report.ok and any("is missing" in p for p in report.problems)
    assert not any("pruned" in n for n in report.notes)


def prune_under(run: Path, loader: Callable[[RunReader, Any], Any]) -> Callable[..., Any]:
    """A loader that, the first time, lets a writer save better checkpoints and prune the one it
    was handed before reading it: the moment a reader beside a writer can hit."""
    calls = []

    def load(reader: RunReader, manifest: Any) -> Any:
        if not calls:
            with (
                pytest.warns(UserWarning, match="retention policy changes"),
                tk.CheckpointManager(run, keep_last=1, keep_best=1, monitor="loss") as mgr,
            ):
                for step in (10, 11):
                    state = {"w": torch.full((4,), float(step)), "step": step}
                    mgr.save(step, state, metrics={"loss": -float(step)})
            assert not manifest.path.exists()  # pruned, its packs with it
        calls.append(manifest.step)
        return loader(reader, manifest)

    load.calls = calls  # type: ignore[attr-defined]
    return load


@pytest.mark.parametrize("which", ["best", "latest"])
def test_a_reference_pruned_while_read_is_resolved_again(tmp_path: Path, which: str) -> None:
    run = make_run(tmp_path)
    loader = prune_under(run, lambda reader, m: reader.load(m))
    state = load_reference(f"{run}@{which}", loader)
    assert state["step"] == 11  # the new best and latest, not "the run was damaged"
    assert torch.equal(state["w"], torch.full((4,), 11.0))
    assert loader.calls == [1, 11]  # type: ignore[attr-defined]


def test_a_step_pruned_while_read_is_reported_as_pruned(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    loader = prune_under(run, lambda reader, m: reader.load(m))
    with pytest.raises(tk.CheckpointNotFoundError, match="step 1 was pruned") as info:
        load_reference(f"{run}@1", loader)  # not CorruptCheckpointError: "the run was damaged"
    assert isinstance(info.value, tk.CheckpointPrunedError)
