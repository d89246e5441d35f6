"""Runs and files on a real S3 server (moto on loopback) through s3fs: what users do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import s3fs
import torch
from torch import nn

import torchkeep as tk
from torchkeep.storage import RemoteStorage, storage_for

SRC = str(Path(tk.__file__).parents[1])


def _fs(options: dict[str, Any]) -> Any:
    return s3fs.S3FileSystem(
        endpoint_url=options["endpoint_url"],
        key="testing",
        secret="testing",
        skip_instance_cache=True,
    )


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x = torch.randn(8, 4, generator=g)
        loss = (model(x) ** 2).mean() + torch.rand(()) * 0  # the global RNG advances too
        opt.zero_grad()
        loss.backward()
        opt.step()


def _app(seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    return {"model": model, "optimizer": torch.optim.Adam(model.parameters()), "rng": tk.RNGState()}


def test_save_load_and_load_into_files(bucket: str, options: dict[str, Any]) -> None:
    model = nn.Linear(5, 3)
    for name in ("m.safetensors", "m.pt"):
        url = f"{bucket}/weights/{name}"
        tk.save(model.state_dict(), url, storage_options=options)
        loaded = tk.load(url, storage_options=options)
        assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
        other = nn.Linear(5, 3)
        report = tk.load_into(other, url, storage_options=options)
        assert sorted(report.loaded) == ["bias", "weight"]
        assert torch.equal(other.weight, model.weight)
        assert tk.inspect(url, storage_options=options).path == url
        assert tk.verify(url, storage_options=options).ok
    assert isinstance(storage_for(f"{bucket}/x", options), RemoteStorage)
    # Nothing was written locally under a mangled name.
    assert not Path("s3:").exists()


def test_a_large_pack_streams_as_multipart_and_loads_exactly(
    bucket: str, options: dict[str, Any]
) -> None:
    from torchkeep.storage._ranges import PART_BYTES

    state = {"big": torch.randn(5_000_000), "small": torch.arange(7)}  # 20 MB: several parts
    url = f"{bucket}/big.safetensors"
    tk.save(state, url, storage_options=options)
    back = tk.load(url, storage_options=options)
    assert torch.equal(back["big"], state["big"]) and torch.equal(back["small"], state["small"])
    parts = -(-_fs(options).info(url)["size"] // PART_BYTES)
    assert parts >= 2
    assert _fs(options).info(url)["ETag"].strip('"').endswith(f"-{parts}")  # a multipart upload


@pytest.mark.parametrize("async_save", [False, True])
def test_manager_resume_is_bit_exact(
    bucket: str, options: dict[str, Any], async_save: bool
) -> None:
    run = f"{bucket}/run"
    straight = _app()
    _train(straight["model"], straight["optimizer"], range(6))

    app = _app()
    with tk.CheckpointManager(
        run, keep_last=2, async_save=async_save, storage_options=options
    ) as mgr:
        for step in range(3):
            _train(app["model"], app["optimizer"], range(step, step + 1))
            mgr.save(step, app, metrics={"loss": float(step)})
        mgr.wait()
        assert [r.step for r in mgr.checkpoints] == [1, 2]

    resumed = _app(seed=123)  # different weights, until restored
    with tk.CheckpointManager(run, storage_options=options) as mgr:
        info = mgr.restore(resumed)
        assert info is not None and info.step == 2
        _train(resumed["model"], resumed["optimizer"], range(3, 6))
    for key, value in straight["model"].state_dict().items():
        assert torch.equal(resumed["model"].state_dict()[key], value), key
    loaded = tk.load(f"{run}@latest", storage_options=options)
    assert set(loaded) == {"model", "optimizer", "rng"}
    assert tk.load(f"{run}@1", storage_options=options)["model"]["0.weight"].shape == (8, 4)


def test_a_second_writer_is_refused_naming_the_holder_and_expiry(
    bucket: str, options: dict[str, Any]
) -> None:
    run = f"{bucket}/locked"
    with tk.CheckpointManager(run, storage_options=options) as mgr:
        mgr.save(0, {"w": torch.ones(2)})
        with pytest.raises(tk.RunLockedError) as refused:
            tk.CheckpointManager(run, storage_options=options)
        message = str(refused.value)
        assert f"pid {os.getpid()}" in message and "lease expires at" in message
        lease = json.loads(_fs(options).cat_file(f"{run}/.lock"))
        assert lease["kind"] == "torchkeep-lease" and lease["expires"] > lease["renewed"]
        # Readers need no lease.
        with tk.CheckpointManager(run, read_only=True, storage_options=options) as reader:
            assert [r.step for r in reader.checkpoints] == [0]
    assert not _fs(options).exists(f"{run}/.lock")  # released
    with tk.CheckpointManager(run, storage_options=options) as again:
        assert again.latest is not None and again.latest.step == 0


def test_of_two_conditional_creates_exactly_one_wins(bucket: str, options: dict[str, Any]) -> None:
    store = storage_for(bucket, options)
    results: list[bool] = []
    start = threading.Barrier(4)

    def create(i: int) -> None:
        start.wait()
        results.append(
            store.create_exclusive(f"{bucket}/race/m.json", lambda f: f.write(b"%d" % i) and None)
        )

    threads = [threading.Thread(target=create, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, False, False, True]
    # A create of the same bytes again (a retried request whose answer was lost) is ours.
    winner = _fs(options).cat_file(f"{bucket}/race/m.json")
    assert store.create_exclusive(f"{bucket}/race/m.json", lambda f: f.write(winner) and None)


def _cli(*args: str, endpoint: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "PYTHONPATH": SRC, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "torchkeep", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_cli_ls_verify_prune_on_a_url(bucket: str, s3_endpoint: str) -> None:
    run = f"{bucket}/cli-run"
    with tk.CheckpointManager(run, keep_last=5) as mgr:  # AWS_ENDPOINT_URL, as the CLI reads it
        for step in range(4):
            mgr.save(step, {"w": torch.full((3,), float(step))}, metrics={"loss": 4.0 - step})
    ls = _cli("ls", run, endpoint=s3_endpoint)
    assert ls.returncode == 0, ls.stderr
    assert "latest" in ls.stdout and "4 (4 saved in all)" in ls.stdout
    verify = _cli("verify", f"{run}@2", endpoint=s3_endpoint)
    assert verify.returncode == 0 and "OK" in verify.stdout, verify.stderr
    prune = _cli("prune", run, "--keep-last", "2", endpoint=s3_endpoint)
    assert prune.returncode == 0, prune.stderr
    assert "deleted 2 checkpoint(s): 0, 1" in prune.stdout
    with tk.CheckpointManager(run, read_only=True) as mgr:
        assert [r.step for r in mgr.checkpoints] == [2, 3]
    assert torch.equal(tk.load(f"{run}@latest")["w"], torch.full((3,), 3.0))
    packs = _fs({"endpoint_url": s3_endpoint}).ls(f"{run}/packs")
    assert len(packs) == 2  # the pruned checkpoints' packs were this process's: collected
