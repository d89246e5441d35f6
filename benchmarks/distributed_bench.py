"""Distributed benchmark: a DDP job of 2 ranks (gloo, CPU) saving and restoring one run with
torchkeep, against ``torch.distributed.checkpoint`` (``dcp.save``/``dcp.load``) of the same state.

The model is replicated (DDP): torchkeep's rank 0 writes it once and each rank adds its RNG;
DCP deduplicates the replicated tensors and writes them once too. Each figure is the median over
``repeat`` saves (loads) of the slowest rank; the weights change before every save (a save
of unchanged weights writes nothing in a torchkeep run), and loads read from the page cache.

In the same job, the model sharded with FSDP2 (``fully_shard``): each rank saves its shards
through torchkeep's DCP writer (``CheckpointManager``) against ``dcp.save`` of the same
``get_model_state_dict``, and loads them back (``restore`` against ``dcp.load``). Then one
process converts the sharded run to a single safetensors file (``torchkeep.convert``), the
growth of its peak resident memory reported beside the weights' size (it streams: about one
shard). Run alone: ``python benchmarks/distributed_bench.py MIB``.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.nn.parallel import DistributedDataParallel

import torchkeep as tk

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import make_model  # noqa: E402


def _rank(mib: int, repeat: int, out: Path) -> None:
    """One rank of the job: time torchkeep's and DCP's save and load of the same state."""
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    rank = dist.get_rank()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = DistributedDataParallel(make_model(mib))
    app = {"model": model, "rng": tk.RNGState()}
    times: dict[str, list[float]] = {k: [] for k in ("tk_save", "tk_load", "dcp_save", "dcp_load")}
    with tk.CheckpointManager(out / "run", keep_last=1, barrier_timeout=300) as mgr:
        for step in range(repeat):
            _perturb(model)  # new bytes: a save of unchanged weights would write nothing
            dist.barrier()
            t = time.perf_counter()
            mgr.save(step, app)
            times["tk_save"].append(time.perf_counter() - t)
            dist.barrier()
            t = time.perf_counter()
            mgr.restore(app)
            times["tk_load"].append(time.perf_counter() - t)
    for step in range(repeat):
        _perturb(model)
        state = {"model": model.module.state_dict()}
        dist.barrier()
        t = time.perf_counter()
        dcp.save(state, checkpoint_id=str(out / f"dcp{step}"))
        times["dcp_save"].append(time.perf_counter() - t)
        dist.barrier()
        t = time.perf_counter()
        dcp.load(state, checkpoint_id=str(out / f"dcp{step}"))
        times["dcp_load"].append(time.perf_counter() - t)
    times.update(_sharded(mib, repeat, out))
    (out / f"rank{rank}.json").write_text(json.dumps(times))
    dist.barrier()
    # No destroy_process_group: a gloo rank whose peer has already left can abort in it
    # ("terminate called without an active exception", seen once in CI), and with the results
    # written nothing is left to say to the other rank.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _sharded(mib: int, repeat: int, out: Path) -> dict[str, list[float]]:
    """FSDP2 shards: torchkeep's sharded save/restore against dcp.save/dcp.load."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    model = make_model(mib)
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    app = {"model": model}
    times: dict[str, list[float]] = {
        k: [] for k in ("sh_tk_save", "sh_tk_load", "sh_dcp_save", "sh_dcp_load")
    }
    with tk.CheckpointManager(out / "sharded", keep_last=1, barrier_timeout=300) as mgr:
        for step in range(repeat):
            _perturb(model)
            dist.barrier()
            t = time.perf_counter()
            mgr.save(step, app)
            times["sh_tk_save"].append(time.perf_counter() - t)
            dist.barrier()
            t = time.perf_counter()
            mgr.restore(app)
            times["sh_tk_load"].append(time.perf_counter() - t)
    for step in range(repeat):
        _perturb(model)
        state = {"model": get_model_state_dict(model)}
        dist.barrier()
        t = time.perf_counter()
        dcp.save(state, checkpoint_id=str(out / f"sharded-dcp{step}"))
        times["sh_dcp_save"].append(time.perf_counter() - t)
        dist.barrier()
        t = time.perf_counter()
        dcp.load(state, checkpoint_id=str(out / f"sharded-dcp{step}"))
        times["sh_dcp_load"].append(time.perf_counter() - t)
    return times


def _convert(out: Path) -> dict[str, Any]:
    """One process converts the sharded run to one file: seconds and peak RSS growth (a child).

    The growth is VmHWM after the conversion less the RSS before it, the high-water mark reset
    first (``/proc/self/clear_refs``) so that the peak of the imports is not counted.
    """
    code = (
        "import sys,time,torchkeep as tk\n"
        "def hwm(reset=False):\n"
        "    if reset:\n"
        "        try:\n"
        "            open('/proc/self/clear_refs','w').write('5')\n"
        "        except OSError:\n"
        "            pass\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status') "
        "if l.startswith('VmHWM'))\n"
        "before=hwm(True);t=time.perf_counter()\n"
        "tk.convert(sys.argv[1]+'@latest',sys.argv[2])\n"
        "print(time.perf_counter()-t,hwm()-before)\n"
    )
    target = str(out / "converted.safetensors")
    run = [sys.executable, "-c", code, str(out / "sharded"), target]
    seconds, grown = subprocess.run(run, capture_output=True, text=True, check=True).stdout.split()
    return {
        "convert_seconds": round(float(seconds), 4),
        "convert_peak_extra_mib": round(int(grown) / 1024, 1),  # over the RSS before it
    }


def _perturb(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)


def bench_distributed(root: Path, mib: int, repeat: int) -> dict[str, Any]:
    """Launch 2 ranks; the median (over repeats) of the slowest rank's seconds, per operation."""
    out = Path(tempfile.mkdtemp(dir=root, prefix="dist-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logs = [(out / f"rank{r}.log").open("w") for r in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--rank", str(mib), str(repeat), str(out)],
            stderr=logs[r],
            env={
                **os.environ,
                "RANK": str(r),
                "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": "1",
            },
        )
        for r in range(2)
    ]
    codes = [p.wait(timeout=900) for p in procs]
    for log in logs:
        log.close()
    if any(codes):
        said = "".join(
            f"\n-- rank {r} (exit {code}):\n{(out / f'rank{r}.log').read_text()[-3000:]}"
            for r, code in enumerate(codes)
        )
        raise RuntimeError(f"a rank of the distributed benchmark failed{said}")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    result: dict[str, Any] = {"mib": mib, "world_size": 2, "backend": "gloo"}
    for key in ranks[0]:
        slowest = [max(rank[key][i] for rank in ranks) for i in range(repeat)]
        result[f"{key}_seconds"] = round(statistics.median(slowest), 4)
    result["save_vs_dcp"] = round(result["tk_save_seconds"] / result["dcp_save_seconds"], 3)
    result["load_vs_dcp"] = round(result["tk_load_seconds"] / result["dcp_load_seconds"], 3)
    for what in ("save", "load"):
        tk_s, dcp_s = result[f"sh_tk_{what}_seconds"], result[f"sh_dcp_{what}_seconds"]
        result[f"sharded_{what}_vs_dcp"] = round(tk_s / dcp_s, 3)
    result.update(_convert(out))
    return result


def print_distributed(res: dict[str, Any]) -> None:
    print(
        f"\n== distributed: DDP, {res['world_size']} ranks ({res['backend']}), {res['mib']} MiB =="
    )
    for what in ("save", "load"):
        tk_s, dcp_s = res[f"tk_{what}_seconds"], res[f"dcp_{what}_seconds"]
        print(
            f"  {what}: torchkeep {tk_s:.3f} s, dcp.{what} {dcp_s:.3f} s "
            f"(x{res[f'{what}_vs_dcp']:.2f})"
        )
    print(f"  FSDP2, sharded, {res['world_size']} ranks:")
    for what in ("save", "load"):
        tk_s, dcp_s = res[f"sh_tk_{what}_seconds"], res[f"sh_dcp_{what}_seconds"]
        print(
            f"  {what}: torchkeep {tk_s:.3f} s, dcp.{what} {dcp_s:.3f} s "
            f"(x{res[f'sharded_{what}_vs_dcp']:.2f})"
        )
    print(
        f"  one process converts the sharded run to one file: {res['convert_seconds']:.3f} s, "
        f"peak memory {res['convert_peak_extra_mib']} MiB over the process before it "
        f"(weights {res['mib']} MiB)"
    )


if __name__ == "__main__":
    if sys.argv[1] == "--rank":
        _rank(int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            print_distributed(bench_distributed(Path(tmp), int(sys.argv[1]), 3))
