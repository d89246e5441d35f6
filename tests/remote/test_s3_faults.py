"""Faults between torchkeep and a real S3 server: a proxy drops connections, answers 5xx, loses
conditional-write races (412/409) and delays uploads; a writer is SIGKILLed mid-upload."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import s3fs
import torch

import torchkeep as tk
from tests.remote._proxy import Fault, S3Proxy

SRC = str(Path(tk.__file__).parents[1])


def _fs(endpoint: str) -> Any:
    return s3fs.S3FileSystem(
        endpoint_url=endpoint, key="testing", secret="testing", skip_instance_cache=True
    )


def _committed(run: str, options: dict[str, Any]) -> list[int]:
    with tk.CheckpointManager(run, read_only=True, storage_options=options) as mgr:
        return [r.step for r in mgr.checkpoints]


def test_a_dropped_connection_is_retried_and_the_save_commits(
    bucket: str, proxy: S3Proxy, via_proxy: dict[str, Any]
) -> None:
    run = f"{bucket}/drop"
    with tk.CheckpointManager(run, storage_options=via_proxy) as mgr:
        dropped = proxy.inject(Fault("PUT", r"/packs/", "drop"))
        mgr.save(0, {"w": torch.arange(6.0)})
        assert dropped.times == 0  # the fault fired, and the retry went through
    assert torch.equal(tk.load(f"{run}@0", storage_options=via_proxy)["w"], torch.arange(6.0))


def test_persistent_5xx_is_a_clean_storage_error_and_loses_nothing(
    bucket: str, proxy: S3Proxy, via_proxy: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = f"{bucket}/five"
    fs = tk.storage.storage_for(run, via_proxy).fs  # type: ignore[attr-defined]
    monkeypatch.setattr(fs, "retries", 2)  # s3fs's own retries (5) on top of botocore's: quicker
    with tk.CheckpointManager(run, storage_options=via_proxy) as mgr:
        mgr.save(0, {"w": torch.zeros(3)})
        proxy.inject(Fault("PUT", r"/packs/", "status", times=100, status=500))
        with pytest.raises(tk.StorageError) as failed:
            mgr.save(1, {"w": torch.ones(3)})
        assert failed.value.path is not None and "/packs/" in failed.value.path
        assert failed.value.hint
        proxy.reset()
        assert _committed(run, via_proxy) == [0]
        mgr.save(1, {"w": torch.ones(3)})  # the store is back: the same step saves
    assert _committed(run, via_proxy) == [0, 1]
    assert torch.equal(tk.load(f"{run}@0", storage_options=via_proxy)["w"], torch.zeros(3))


@pytest.mark.parametrize("status", [412, 409])
def test_a_lost_conditional_create_commits_nothing(
    bucket: str, proxy: S3Proxy, via_proxy: dict[str, Any], status: int
) -> None:
    run = f"{bucket}/race{status}"
    with tk.CheckpointManager(run, storage_options=via_proxy) as mgr:
        mgr.save(0, {"w": torch.zeros(3)})
        proxy.inject(
            Fault(
                "PUT",
                r"/checkpoints/0+1\.json",
                "status",
                status=status,
                times=5,
                header="If-None-Match",
            )
        )
        with pytest.raises(tk.StorageError) as lost:
            mgr.save(1, {"w": torch.ones(3)})
        assert "0000000001.json" in (lost.value.path or "")
        proxy.reset()
        assert _committed(run, via_proxy) == [0]
        packs = _fs(via_proxy["endpoint_url"]).ls(f"{run}/packs")
        assert len(packs) == 1  # the failed save's pack is gone again
    assert torch.equal(tk.load(f"{run}@latest", storage_options=via_proxy)["w"], torch.zeros(3))


def test_a_manifest_whose_answer_was_lost_is_committed_once(
    bucket: str, proxy: S3Proxy, via_proxy: dict[str, Any]
) -> None:
    """The conditional PUT reached the server, the answer did not: the retry gets 412, and the
    object read back holds our bytes, so the save is committed (not reported as lost)."""
    run = f"{bucket}/lost"
    with tk.CheckpointManager(run, storage_options=via_proxy) as mgr:
        fault = proxy.inject(Fault("PUT", r"/checkpoints/0+\.json", "lost", header="If-None-Match"))
        mgr.save(0, {"w": torch.full((2,), 7.0)})
        assert fault.times == 0
    assert _committed(run, via_proxy) == [0]


_WRITER = textwrap.dedent(
    """
    import sys, torch, torchkeep as tk
    mgr = tk.CheckpointManager(sys.argv[1])
    mgr.save(0, {"w": torch.arange(4.0)})
    print("saved", flush=True)
    mgr.save(1, {"w": torch.randn(6_000_000)})  # 24 MB: a multipart upload, delayed
    print("not killed", flush=True)
    """
)


@pytest.mark.slow
def test_sigkill_mid_upload_commits_nothing_and_the_next_writer_sweeps(
    bucket: str, proxy: S3Proxy, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = f"{bucket}/killed"
    proxy.inject(Fault("PUT", r"uploadId=", "delay", seconds=1.0, times=50))
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": proxy.url,
        "PYTHONPATH": SRC,
        "TORCHKEEP_LEASE_SECONDS": "2",
    }
    child = subprocess.Popen(
        [sys.executable, "-c", _WRITER, run], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "saved"
        deadline = time.monotonic() + 60
        while not any("uploadId=" in path for method, path in proxy.seen if method == "PUT"):
            assert time.monotonic() < deadline, "the writer never started its upload"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=30)
        if child.stdout is not None:
            child.stdout.close()
    fs = _fs(s3_endpoint)
    bucket_name = bucket.removeprefix("s3://")
    pending = fs.call_s3("list_multipart_uploads", Bucket=bucket_name, Prefix="killed/")
    assert len(pending.get("Uploads", [])) == 1  # unfinished: invisible to readers
    assert _committed(run, {}) == [0]
    assert len(fs.ls(f"{run}/packs")) == 1

    lease = json.loads(fs.cat_file(f"{run}/.lock"))
    assert lease["pid"] == child.pid
    if lease["expires"] > time.time() + 0.5:
        with pytest.raises(tk.RunLockedError, match=f"pid {child.pid}"):
            tk.CheckpointManager(run)
    time.sleep(max(lease["expires"] - time.time(), 0) + 0.2)
    monkeypatch.setenv("TORCHKEEP_SWEEP_GRACE_SECONDS", "0")
    with tk.CheckpointManager(run) as mgr:  # takes over the expired lease, sweeps the upload
        assert [r.step for r in mgr.checkpoints] == [0]
        mgr.save(1, {"w": torch.ones(2)})
    pending = fs.call_s3("list_multipart_uploads", Bucket=bucket_name, Prefix="killed/")
    assert pending.get("Uploads", []) == []
    assert torch.equal(tk.load(f"{run}@0")["w"], torch.arange(4.0))
