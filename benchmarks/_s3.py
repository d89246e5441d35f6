"""Save and load throughput on S3: a moto server on loopback, through s3fs.

Measured in one run, on the same bytes, the ways taking turns: s3fs ``pipe``/``cat`` of one
object (the link's limit here), ``torchkeep.save``/``load`` of a URL, a ``CheckpointManager``
save and a load of ``RUN@latest``, and DCP's ``FsspecWriter``/``FsspecReader``. The state is a
few large float32 tensors."""

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


def _interleaved(ops: dict[str, Callable[[], Any]], repeat: int) -> dict[str, list[float]]:
    """Seconds of each op over ``repeat`` rounds, the ops taking turns (each round starting
    with the next one), so that a slow spell of the machine or a server grown fuller with
    every write falls on all of them alike. Each op runs once first, unmeasured (warm-up)."""
    names = list(ops)
    times: dict[str, list[float]] = {name: [] for name in names}
    for name in names:
        ops[name]()
    for round_ in range(repeat):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            t = time.perf_counter()
            ops[name]()
            times[name].append(time.perf_counter() - t)
    return times


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
        raw = b"".join(t.numpy().tobytes() for t in state.values())
        base = f"s3://{bucket}"
        url = f"{base}/x.safetensors"
        run = f"{base}/run"
        steps = iter(range(1, 1_000_000))
        dcp_ops = _dcp(state, f"{base}/dcp", options)
        with tk.CheckpointManager(run, keep_last=1, storage_options=options) as mgr:

            def save_step() -> None:  # new values each step: no pack is shared (no dedup)
                step = next(steps)
                mgr.save(step, {"w": {k: v + step for k, v in state.items()}})

            save = _interleaved(
                {
                    "s3fs pipe (raw bytes)": lambda: fs.pipe(f"{base}/raw.bin", raw),
                    "torchkeep.save": lambda: tk.save(state, url, storage_options=options),
                    "CheckpointManager sync": save_step,
                    **({"DCP FsspecWriter": dcp_ops[0]} if dcp_ops else {}),
                },
                repeat,
            )
        load = _interleaved(
            {
                "s3fs cat (raw bytes)": lambda: fs.cat(f"{base}/raw.bin"),
                "torchkeep.load": lambda: tk.load(url, storage_options=options),
                "load RUN@latest": lambda: tk.load(
                    f"{run}@latest", storage_options=options, verify=False
                ),
                **({"DCP FsspecReader": dcp_ops[1]} if dcp_ops else {}),
            },
            repeat,
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {
        "mib": mib,
        "bytes": nbytes,
        "save_seconds": {k: statistics.median(v) for k, v in save.items()},
        "load_seconds": {k: statistics.median(v) for k, v in load.items()},
        "save_spread": {k: [min(v), max(v)] for k, v in save.items()},
        "load_spread": {k: [min(v), max(v)] for k, v in load.items()},
    }


def _dcp(
    state: dict[str, torch.Tensor], path: str, options: dict[str, Any]
) -> tuple[Callable[[], Any], Callable[[], Any]] | None:
    """DCP's fsspec save and load of ``state`` (each load reads the first save)."""
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
    except ImportError:
        return None
    counter = iter(range(1_000_000))
    target = {k: torch.empty_like(v) for k, v in state.items()}

    def write() -> None:
        dcp.save(dict(state), storage_writer=FsspecWriter(f"{path}/{next(counter)}", **options))

    def read() -> None:
        dcp.load(target, storage_reader=FsspecReader(f"{path}/0", **options))

    return write, read


def print_remote(res: dict[str, Any]) -> None:
    gb = res["bytes"] / 1e9
    print(f"\n== S3 on loopback (moto), state {res['mib']} MiB, ops interleaved ==")
    for what, raw_name, vs in (
        ("save", "s3fs pipe (raw bytes)", "pipe"),
        ("load", "s3fs cat (raw bytes)", "cat"),
    ):
        raw = res[f"{what}_seconds"][raw_name]
        print(f"{what:42s} {'median s':>9s} {'min-max s':>13s} {'GB/s':>6s} {'vs ' + vs:>8s}")
        for name, s in res[f"{what}_seconds"].items():
            lo, hi = res[f"{what}_spread"][name]
            print(f"{name:42s} {s:9.3f} {lo:6.3f}-{hi:6.3f} {gb / s:6.2f} {raw / s:7.2f}x")


def remote_ratios(res: dict[str, Any]) -> dict[str, float]:
    pipe = res["save_seconds"]["s3fs pipe (raw bytes)"]
    cat = res["load_seconds"]["s3fs cat (raw bytes)"]
    out = {f"S3 save {k} / pipe": pipe / v for k, v in res["save_seconds"].items()}
    out.update({f"S3 load {k} / cat": cat / v for k, v in res["load_seconds"].items()})
    return out
