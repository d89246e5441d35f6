"""Save and load throughput on S3: a moto server on loopback, through s3fs.

Measured in one run, on the same bytes: s3fs ``pipe``/``cat`` of one object (the link's limit
here), ``torchkeep.save``/``load`` of a URL, a ``CheckpointManager`` save/restore, and DCP's
``FsspecWriter``/``FsspecReader``. The state is a few large float32 tensors.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import torch

import torchkeep as tk


def _median(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def bench_remote(mib: int, repeat: int) -> dict[str, Any] | None:
    """The remote section, or ``None`` when moto or s3fs is not installed."""
    try:
        import moto.server  # noqa: F401 - the server runs in a process of its own
        import s3fs
    except ImportError:
        return None
    port = _free_port()
    # Its own process: in this one it would share the GIL with the client being measured.
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                return None
            time.sleep(0.1)
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    try:
        fs = s3fs.S3FileSystem(**options)
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        fs.mkdir(bucket)
        n = mib * (1 << 20) // 4 // 4
        state = {f"layer{i}.weight": torch.randn(n) for i in range(4)}
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        raw = [b"".join(t.numpy().tobytes() for t in state.values())]
        base = f"s3://{bucket}"
        save: dict[str, float] = {}
        load: dict[str, float] = {}
        save["s3fs pipe (raw bytes)"] = _median(lambda: fs.pipe(f"{base}/raw.bin", raw[0]), repeat)
        load["s3fs cat (raw bytes)"] = _median(lambda: fs.cat(f"{base}/raw.bin"), repeat)
        raw.clear()
        url = f"{base}/x.safetensors"
        save["torchkeep.save"] = _median(
            lambda: tk.save(state, url, storage_options=options), repeat
        )
        load["torchkeep.load"] = _median(lambda: tk.load(url, storage_options=options), repeat)
        steps = iter(range(1, 1_000_000))
        run = f"{base}/run"
        with tk.CheckpointManager(run, keep_last=1, storage_options=options) as mgr:

            def save_step() -> None:  # new values each step: no pack is shared (no dedup)
                step = next(steps)
                mgr.save(step, {"w": {k: v + step for k, v in state.items()}})

            save["CheckpointManager sync"] = _median(save_step, repeat)
        load["load RUN@latest"] = _median(
            lambda: tk.load(f"{run}@latest", storage_options=options, verify=False), repeat
        )
        _dcp(state, f"{base}/dcp", options, repeat, save, load)
    finally:
        server.terminate()
        server.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {"mib": mib, "bytes": nbytes, "save_seconds": save, "load_seconds": load}


def _dcp(
    state: dict[str, torch.Tensor],
    path: str,
    options: dict[str, Any],
    repeat: int,
    save: dict[str, float],
    load: dict[str, float],
) -> None:
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
    except ImportError:
        return
    counter = iter(range(1_000_000))

    def write() -> None:
        dcp.save(dict(state), storage_writer=FsspecWriter(f"{path}/{next(counter)}", **options))

    save["DCP FsspecWriter"] = _median(write, repeat)
    target = {k: torch.empty_like(v) for k, v in state.items()}
    load["DCP FsspecReader"] = _median(
        lambda: dcp.load(target, storage_reader=FsspecReader(f"{path}/0", **options)), repeat
    )


def print_remote(res: dict[str, Any]) -> None:
    gb = res["bytes"] / 1e9
    pipe = res["save_seconds"]["s3fs pipe (raw bytes)"]
    cat = res["load_seconds"]["s3fs cat (raw bytes)"]
    print(f"\n== S3 on loopback (moto), state {res['mib']} MiB ==")
    print(f"{'save':42s} {'median s':>9s} {'GB/s':>6s} {'vs pipe':>8s}")
    for name, s in res["save_seconds"].items():
        print(f"{name:42s} {s:9.3f} {gb / s:6.2f} {pipe / s:7.2f}x")
    print(f"{'load':42s} {'median s':>9s} {'GB/s':>6s} {'vs cat':>8s}")
    for name, s in res["load_seconds"].items():
        print(f"{name:42s} {s:9.3f} {gb / s:6.2f} {cat / s:7.2f}x")


def remote_ratios(res: dict[str, Any]) -> dict[str, float]:
    pipe = res["save_seconds"]["s3fs pipe (raw bytes)"]
    cat = res["load_seconds"]["s3fs cat (raw bytes)"]
    out = {f"S3 save {k} / pipe": pipe / v for k, v in res["save_seconds"].items()}
    out.update({f"S3 load {k} / cat": cat / v for k, v in res["load_seconds"].items()})
    return out
