"""FSDP2 sharded checkpoints through torchkeep's DCP writer and reader, with real processes.

One 2-rank job saves (and loses a rank mid-save), one 3-rank job restores and saves again; this
process then reads the run whole (world size 1): restore, tk.load, load_into, convert, verify.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

import torchkeep as tk
from tests.cli._helpers import torchkeep_command
from tests.distributed._fsdp_workers import model_of
from tests.distributed._launch import launch

WORKERS = Path(__file__).with_name("_fsdp_workers.py")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Any], list[Any]]:
    out = tmp_path_factory.mktemp("fsdp")
    saved = launch("save2", out, 2, workers=WORKERS)
    restored = launch("restore3", out, 3, workers=WORKERS)
    return out, saved, restored


def _app(seed: int) -> dict[str, Any]:
    model = model_of(seed)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    return {"model": model, "optimizer": opt, "rng": tk.RNGState(), "epoch": -1}


def _assert_equal(full: dict[str, torch.Tensor], model: Any, opt: Any) -> None:
    weights = model.state_dict()
    state = get_optimizer_state_dict(model, opt)["state"]
    n = 0
    for key, value in full.items():
        if key.startswith("model."):
            assert torch.equal(weights[key.removeprefix("model.")], value), key
        else:
            fqn, name = key.removeprefix("optimizer.state.").rsplit(".", 1)
            assert torch.equal(state[fqn][name], value), key
        n += 1
    assert n == 4 + 4 * 3  # 4 parameters; Adam's step, exp_avg, exp_avg_sq of each


def test_a_rank_killed_mid_sharded_save_commits_nothing(job: tuple[Path, list[Any], Any]) -> None:
    out, (rank0, rank1), _ = job
    assert rank1 == {}  # its last words, written before it was killed inside the shard write
    name, text, seconds = rank0["killed"]
    assert name == "DistributedError" and "rank 1 did not arrive" in text, text
    assert 3.5 < seconds < 20
    # step 2 was not committed by the 2 ranks: the 3-rank job restored step 1
    assert [r["step"] for r in job[2]] == [1, 1, 1]


def test_one_rank_alone_cannot_save_shards(job: tuple[Path, list[Any], Any]) -> None:
    out, (rank0, _), _ = job
    assert "sharded entries 'model', 'optimizer' span the job's ranks" in rank0["alone"]
    assert "without distributed=False" in rank0["alone"]
    assert not tk.CheckpointManager(out / "alone", read_only=True).checkpoints


def test_async_sharded_save_commits_after_every_rank(job: tuple[Path, Any, list[Any]]) -> None:
    for rank in job[2]:  # wait() gave each rank the committed record, on 3 ranks
        assert rank["record"] == 2 and rank["committed"] == [0, 1, 2] and rank["epoch"] == 3


def test_two_ranks_save_three_restore_equal_tensors(job: tuple[Path, list[Any], Any]) -> None:
    out = job[0]
    saved, restored = tk.load(out / "full1.safetensors"), tk.load(out / "restored3.safetensors")
    assert saved.keys() == restored.keys() and len(saved) == 16
    for key, value in saved.items():
        assert torch.equal(restored[key], value), key


def test_manifest_holds_no_pickle_and_hashes_every_shard(job: tuple[Path, Any, Any]) -> None:
    run = job[0] / "run"
    doc = json.loads((run / "checkpoints" / "0000000001.json").read_text().rsplit("\n", 1)[0])
    entries = doc["sharded"]["entries"]
    chunks = entries["model.0.weight"]["tensor"]["chunks"]
    assert [c["offsets"] for c in chunks] == [[0, 0], [8, 0]]  # one shard per rank
    for chunk in chunks:
        assert doc["tensors"][chunk["ref"]]["hash"].startswith("xxh3_128:")
    assert entries["optimizer.param_groups.0.lr"] == {"value": 0.01}
    assert not [p for p in run.rglob("*") if p.suffix in (".distcp", ".pkl", ".pt")]


def test_one_process_restores_three_rank_save(job: tuple[Path, Any, Any]) -> None:
    out = job[0]
    app = _app(3)
    with tk.CheckpointManager(out / "run", read_only=True) as mgr:
        assert [r.step for r in mgr.checkpoints] == [0, 1, 2]
        info = mgr.restore(app, rank_state="wrap")
    assert info is not None and info.step == 2 and app["epoch"] == 2
    # the weights of step 2, though training went on while it was written in the background
    _assert_equal(tk.load(out / "full2.safetensors"), app["model"], app["optimizer"])


def test_single_process_load_load_into_and_convert(job: tuple[Path, Any, Any]) -> None:
    out = job[0]
    full = tk.load(out / "full1.safetensors")
    state = tk.load(f"{out / 'run'}@1")
    assert state["epoch"] == 1
    for key, value in full.items():
        if key.startswith("model."):
            assert torch.equal(state["model"][key.removeprefix("model.")], value)
    assert state["optimizer"]["param_groups"][0]["params"] == [
        "0.weight",
        "0.bias",
        "2.weight",
        "2.bias",
    ]
    model = model_of(9)
    report = tk.load_into(model, f"{out / 'run'}@1")
    assert report.ok if hasattr(report, "ok") else True
    for key, value in full.items():
        if key.startswith("model."):
            assert torch.equal(model.state_dict()[key.removeprefix("model.")], value)
    target = out / "model.safetensors"
    done = subprocess.run(
        [*torchkeep_command(), "convert", f"{out / 'run'}@latest", str(target)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    converted = tk.load(target)
    full2 = tk.load(out / "full2.safetensors")
    assert torch.equal(converted["model"]["2.weight"], full2["model.2.weight"])


def test_verify_detects_a_flipped_byte_in_a_shard(
    job: tuple[Path, Any, Any], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(job[0] / "run", run)
    assert tk.verify(run).ok
    doc = json.loads((run / "checkpoints" / "0000000001.json").read_text().rsplit("\n", 1)[0])
    pack = run / "packs" / doc["tensors"]["model.2.weight@3,0"]["pack"]
    data = bytearray(pack.read_bytes())
    data[-3] ^= 0xFF  # inside the tensor data, at the end of the pack
    pack.write_bytes(bytes(data))
    report = tk.verify(run)
    assert not report.ok
    with pytest.raises(tk.CorruptCheckpointError, match=r"does not match its hash"):
        tk.load(f"{run}@1")


def test_altered_sharded_metadata_is_refused(job: tuple[Path, Any, Any], tmp_path: Path) -> None:
    from torchkeep.format import seal_json

    run = tmp_path / "run"
    shutil.copytree(job[0] / "run", run)
    path = run / "checkpoints" / "0000000001.json"
    doc = json.loads(path.read_text())
    del doc["digest"]
    doc["sharded"]["entries"]["model.2.weight"]["tensor"]["chunks"][1]["offsets"] = [5, 0]
    path.write_bytes(seal_json(json.dumps(doc).encode()))  # resealed: only the check stands
    with pytest.raises(tk.CorruptCheckpointError, match=r"'model.2.weight'.*outside its tensor"):
        tk.load(f"{run}@1")


def test_a_value_without_json_form_is_refused_not_pickled(tmp_path: Path) -> None:
    from torchkeep.distributed._sharded import save_shards

    (tmp_path / "packs").mkdir()
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.param_groups[0]["hook"] = object()  # DCP would torch.save (pickle) it
    app = {"model": model, "optimizer": opt}
    with pytest.raises(tk.UnsupportedValueError, match=r"'optimizer.param_groups.0.hook'"):
        save_shards(tmp_path, 0, 0, app, ["model", "optimizer"], lambda ts: {})
    assert list((tmp_path / "packs").iterdir()) == []  # nothing written


def test_restore_into_another_architecture_is_refused(job: tuple[Path, Any, Any]) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 7))
    app = {"model": model, "optimizer": torch.optim.Adam(model.parameters()), "epoch": 0}
    mgr = tk.CheckpointManager(job[0] / "run", read_only=True)
    with pytest.raises(tk.IncompatibleStateError, match=r"sharded state does not fit"):
        mgr.restore(app, rank_state="reset")
    mgr.close()


def test_retention_ls_and_references_on_a_sharded_run(
    job: tuple[Path, Any, Any], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(job[0] / "run", run)
    before = {p.name for p in (run / "packs").iterdir()}
    with tk.CheckpointManager(run) as mgr:
        assert mgr.prune(keep_last=1) == [0, 1]
        kept = mgr.checkpoints
    assert [r.step for r in kept] == [2]
    left = {p.name for p in (run / "packs").iterdir()}
    manifest = json.loads((run / "checkpoints" / "0000000002.json").read_text())
    assert left == set(manifest["packs"]) and left < before  # shard packs of 0, 1 collected
    assert len([n for n in left if n.startswith("0000000002-")]) == 6  # 3 ranks: shards, RNG
    assert tk.verify(run).ok
    full2 = tk.load(job[0] / "full2.safetensors")
    state = tk.load(f"{run}@latest")
    assert torch.equal(state["model"]["0.weight"], full2["model.0.weight"])
    with pytest.raises(tk.CheckpointNotFoundError, match="steps available: 2"):
        tk.load(f"{run}@1")
    done = subprocess.run(
        [*torchkeep_command(), "ls", str(run)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "2" in done.stdout, done.stderr
