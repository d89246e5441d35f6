"""DDP: real ranks (gloo on CPU, separate processes) saving one run, and restores at any world size."""

from __future__ import annotations

import datetime
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep as tk
from tests.distributed._launch import launch
from torchkeep.distributed import RANKS_KEY, RankGroup, ranked_view


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Any]]:
    out = tmp_path_factory.mktemp("ddp")
    return out / "run", launch("resume", out)


def test_two_ranks_resume_bit_exact(resumed: tuple[Path, list[Any]]) -> None:
    _, results = resumed
    for rank, result in enumerate(results):
        assert result["resumed"] == result["reference"], f"rank {rank} diverged after resume"
    assert results[0]["reference"] == results[1]["reference"]  # DDP kept the ranks in step


def test_async_saves_commit_after_every_rank(resumed: tuple[Path, list[Any]]) -> None:
    _, results = resumed
    for result in results:
        assert result["async"] == [2, [0, 1, 2]]


def test_checkpoint_holds_each_ranks_state_and_the_unwrapped_model(
    resumed: tuple[Path, list[Any]],
) -> None:
    run, _ = resumed
    state = tk.load(f"{run}@2")
    assert sorted(state["model"]) == ["bias", "weight"]  # no "module." prefix
    ranks = state[RANKS_KEY]
    assert ranks["world_size"] == 2 and ranks["keys"] == ["rng"]
    assert not torch.equal(ranks["0"]["rng"]["torch"], ranks["1"]["rng"]["torch"])
    report = tk.verify(run)
    assert report.ok


def _single_app() -> dict[str, Any]:
    torch.manual_seed(5)
    model = nn.Linear(8, 4)
    return {
        "model": model,
        "optimizer": torch.optim.Adam(model.parameters(), lr=0.01),
        "rng": tk.RNGState(),
        "step": -1,
    }


def test_one_process_restores_under_an_explicit_policy(resumed: tuple[Path, list[Any]]) -> None:
    run, _ = resumed
    saved = tk.load(f"{run}@2")
    with tk.CheckpointManager(run, read_only=True) as mgr:
        app = _single_app()
        before = app["model"].weight.detach().clone()
        with pytest.raises(tk.IncompatibleStateError) as info:
            mgr.restore(app, 2)
        text = str(info.value)
        assert "saved by 2 ranks" in text and "'rng'" in text and "this job has 1" in text
        assert "rank_state='reset'" in text
        assert torch.equal(app["model"].weight, before)  # refused before anything changed

        mgr.restore(app, 2, rank_state="wrap")  # rank 0 takes saved rank 0's state
        assert torch.equal(app["model"].weight, saved["model"]["weight"])
        assert app["step"] == 2
        assert torch.equal(torch.get_rng_state(), saved[RANKS_KEY]["0"]["rng"]["torch"])

        app = _single_app()
        rng = torch.get_rng_state()
        with pytest.warns(tk.TorchkeepWarning, match=r"per-rank 'rng' not restored"):
            mgr.restore(app, 2, rank_state="reset")
        assert torch.equal(torch.get_rng_state(), rng)
        assert torch.equal(app["model"].weight, saved["model"]["weight"])


def test_crash_mid_save_commits_nothing(tmp_path: Path) -> None:
    holder = tk.CheckpointManager(tmp_path / "locked")  # another writer holds this run
    try:
        results = launch("crash", tmp_path)
    finally:
        holder.close()
    rank0, rank1 = results
    # rank 0 cannot open the locked run; rank 1 gets its error at once, not after a timeout
    assert rank0["locked"][0] == "RunLockedError"
    name, text, seconds = rank1["locked"]
    assert name == "DistributedError" and "rank 0 failed" in text and "RunLockedError" in text
    assert seconds < 30
    # rank 0 could not store step 1: rank 1 raises its error, without waiting out the timeout
    assert rank0["bad"][0] == "UnsupportedValueError"
    name, text, seconds = rank1["bad"]
    assert name == "DistributedError" and "rank 0 failed" in text and "'bad'" in text, text
    assert seconds < 3.5
    # rank 1 was SIGKILLed while saving step 2: rank 0 names it, within its 4 s timeout
    assert "killed" not in rank1 and "saved0" in rank1  # its last words, before the kill
    name, text, seconds = rank0["killed"]
    assert name == "DistributedError" and "rank 1 did not arrive" in text, text
    assert 3.5 < seconds < 20
    run = tmp_path / "run"
    with tk.CheckpointManager(run) as mgr:  # a new writer sweeps the dead rank's pack
        assert [r.step for r in mgr.checkpoints] == [0]
        app = _single_app()
        mgr.restore(app, rank_state="wrap")
        saved0 = torch.tensor(rank0["saved0"][0]).view(4, 8)
        assert torch.equal(app["model"].weight.detach(), saved0)
    assert len(list((run / "packs").iterdir())) == 2  # step 0's two packs, no orphan
    assert tk.verify(run).ok


def test_a_rank_that_does_not_arrive_is_named() -> None:
    store = torch.distributed.TCPStore(
        "127.0.0.1", 0, 2, True, timeout=datetime.timedelta(seconds=5), wait_for_workers=False
    )
    group = RankGroup(rank=0, world_size=3, store=store, timeout=0.5, prefix="t")
    group_1 = RankGroup(rank=1, world_size=3, store=store, timeout=0.5, prefix="t")
    group_2 = RankGroup(rank=2, world_size=3, store=store, prefix="t")
    group_1.announce()  # both built their managers (ranks do at construction)
    group_2.announce()
    group_1.post("t/k", {"step": 1})
    t0 = time.monotonic()
    with pytest.raises(tk.DistributedError, match=r"rank 2 did not arrive .* within 0.5 s"):
        group.gather("t/k", [1, 2], "with its part")
    assert time.monotonic() - t0 < 3
    group_2.post("t/k", {"error": "Boom: disk"})
    with pytest.raises(tk.DistributedError, match=r"rank 2 failed with its part: Boom: disk"):
        group.gather("t/k", [1, 2], "with its part")


def test_a_rank_that_never_built_its_manager_is_told_apart() -> None:
    store = torch.distributed.TCPStore(
        "127.0.0.1", 0, 2, True, timeout=datetime.timedelta(seconds=5), wait_for_workers=False
    )
    group = RankGroup(rank=0, world_size=3, store=store, timeout=0.5, prefix="j")
    RankGroup(rank=1, world_size=3, store=store, prefix="j").announce()  # built, but late
    with pytest.raises(tk.DistributedError) as caught:
        group.gather("j/k", [1, 2], "with its part")
    assert "rank 2 of 3 never built a CheckpointManager" in str(caught.value)
    assert "distributed=False" in str(caught.value)
    assert group.broken  # close() will not wait for it again


def test_one_rank_checkpoints_alone(resumed: tuple[Path, list[Any]]) -> None:
    run, results = resumed
    alone = results[0]["alone"]
    assert alone["seconds"] < 30  # no meeting: it waited for no one
    assert [
        r.step for r in tk.CheckpointManager(run.parent / "alone", read_only=True).checkpoints
    ] == [0, 1]
    assert RANKS_KEY not in tk.load(f"{run.parent / 'alone'}@latest")
    message, seconds = alone["forgot"]
    assert "rank 1 of 2 never built a CheckpointManager" in message
    assert "distributed=False" in message
    assert seconds < 5.5, "close() waited again for the rank that never came"  # timeout 3 s


def test_policy_and_per_rank_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(tk.InvalidArgumentError, match="rank_state must be one of"):
        tk.CheckpointManager(tmp_path / "r", rank_state="loose")  # type: ignore[arg-type]
    state = {"w": 1, RANKS_KEY: {"world_size": 2, "keys": ["g"], "0": {"g": 0}, "1": {"g": 1}}}
    view, left = ranked_view(
        state, {"w": 0, "g": 0}, rank=1, world_size=2, policy="strict", per_rank=["g"]
    )
    assert view == {"w": 1, "g": 1} and left == []
    with pytest.raises(tk.InvalidArgumentError, match="per_rank names 'nope'"):
        ranked_view(state, {"w": 0}, rank=0, world_size=2, policy="strict", per_rank=["nope"])


def test_world_size_matters_only_when_state_was_saved_per_rank() -> None:
    plain = {"w": 1, "epoch": 3}  # one process, nothing per rank: any world size restores it
    view, left = ranked_view(plain, {"w": 0}, rank=1, world_size=2, policy="strict")
    assert view == plain and left == []
    g = torch.Generator()
    saved = {"w": 1, "g": {"__torchkeep__": "generator", "state": g.get_state()}}
    with pytest.raises(tk.IncompatibleStateError, match=r"saved by 1 rank, each with its own 'g'"):
        ranked_view(saved, {"w": 0, "g": g}, rank=1, world_size=2, policy="strict")
    view, left = ranked_view(saved, {"w": 0, "g": g}, rank=1, world_size=2, policy="wrap")
    assert view["g"] is saved["g"] and left == []


def test_fsdp2_shards_of_plain_dcp_load_whole_in_one_process(
    resumed: tuple[Path, list[Any]],
) -> None:
    run, results = resumed
    tmp_path = run.parent
    assert results[0]["fsdp"]["local"]["0.weight"] == [8, 8]  # sharded: half the rows each
    full = tk.load(tmp_path / "full.safetensors")
    loaded = tk.load(tmp_path / "dcp")["model"]
    assert sorted(loaded) == sorted(full)
    for key, value in full.items():
        assert torch.equal(loaded[key], value), key
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 6))
    tk.load_into(model, tmp_path / "dcp")
    assert torch.equal(model[2].weight, full["2.weight"])


def test_one_process_resumes_a_two_rank_run_bit_exact(resumed: tuple[Path, list[Any]]) -> None:
    """One process holds both ranks' RNG states from the checkpoint and takes DDP's steps itself
    (each rank's gradient halved, then summed, as DDP's all-reduce does): the weights at the
    end equal those of the uninterrupted 2-rank run, bit for bit."""
    run, results = resumed
    app = _single_app()
    with tk.CheckpointManager(run, read_only=True) as mgr:
        mgr.restore(app, 2, rank_state="wrap")  # rank 0's RNG; rank 1's is in the same checkpoint
    rng = [torch.get_rng_state(), tk.load(f"{run}@2")[RANKS_KEY]["1"]["rng"]["torch"]]
    model, opt = app["model"], app["optimizer"]
    for _ in range(3, 6):
        grads = []
        for rank in (0, 1):
            torch.set_rng_state(rng[rank])
            x = torch.randn(16, 8)
            rng[rank] = torch.get_rng_state()
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for p, g0, g1 in zip(model.parameters(), *grads, strict=True):
            p.grad = g0 / 2 + g1 / 2
        opt.step()
    final = [p.detach().flatten().tolist() for p in model.parameters()]
    assert final == results[0]["reference"]


def test_one_process_run_keeps_strict_restore_of_per_rank_entries(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    with tk.CheckpointManager(tmp_path / "r") as mgr:
        mgr.save(0, {"model": model, "epoch": 1})
        with pytest.raises(tk.IncompatibleStateError, match="no entry for 'rng'"):
            mgr.restore({"model": model, "rng": tk.RNGState(), "epoch": 0})
        rng = tk.RNGState()
        mgr.save(1, {"model": model, "rng": rng, "epoch": 2})
        saved = torch.get_rng_state()
        torch.rand(3)
        app = {"model": model, "rng": rng, "epoch": 0}
        mgr.restore(app)
        assert app["epoch"] == 2 and torch.equal(torch.get_rng_state(), saved)
        assert RANKS_KEY not in tk.load(tmp_path / "r")  # one process: no per-rank block
