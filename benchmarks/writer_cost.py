"""What the background writer costs the training loop, by how it runs.

One staged state (a 64 MiB-parameter MLP with Adam, 192 MiB) is hashed and written as a
checkpoint (``write_checkpoint``: xxh3-128 hashes, pack, fsync, manifest) again and again in the
background, while the loop thread runs either training steps (torch kernels, which release the
GIL) or a pure-Python loop (which needs the GIL). The loop's rate against its rate with no writer
gives the writer's cost to the loop. Writers compared, interleaved, median of ``--repeat``:

* ``thread``: a thread of this process, as torchkeep's save thread;
* ``thread, nice +10, io low``: the same, lowered with ``_staging.lower_priority`` (per thread on
  Linux: ``setpriority`` and ``ioprio_set`` on the thread id);
* ``process (shared memory)``: a separate process writing the same tensors, shared with it through
  shared memory (no GIL in common with the loop, only the CPU and the disk).

Also the fraction of a Python thread's rate left while each stage of a write runs in another
thread (1.0: the stage releases the GIL the whole time and there is a spare core).

Usage: python benchmarks/writer_cost.py [--mib 64] [--seconds 3] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import xxhash

from torchkeep.format import Flattened, flatten
from torchkeep.manager._runfile import create_run
from torchkeep.manager._staging import lower_priority
from torchkeep.manager._writer import Hasher, write_checkpoint


def _state(mib: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    layers = max(1, mib // 4)
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(layers)])
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(8, 1024)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optim": opt.state_dict()}  # type: ignore[dict-item]


def write_once(root: Path, flat: Flattened, step: int, hasher: Hasher) -> None:
    write_checkpoint(
        root, step, flat, hasher.hashes(flat.tensors), [], metrics={}, metadata={}, system={}
    )
    for p in (root / "packs").iterdir():
        p.unlink()
    for p in (root / "checkpoints").iterdir():
        p.unlink()


def _writer_loop(root: Path, flat: Flattened, stop: threading.Event, nice: bool) -> None:
    if nice:
        lower_priority()
    hasher = Hasher()
    step = 0
    while not stop.is_set():
        write_once(root, flat, step, hasher)
        step += 1
    hasher.close()


def _process_main(root: str, tensors: dict[str, torch.Tensor], skeleton: Any, pipe: Any) -> None:
    """The writer process: writes while told ("go" ... "stop"), until "exit"."""
    flat = Flattened(skeleton=skeleton, tensors=tensors)
    pipe.send("ready")
    while (message := pipe.recv()) != "exit":
        assert message == "go"
        stop = threading.Event()
        t = threading.Thread(target=_writer_loop, args=(Path(root), flat, stop, False))
        t.start()
        pipe.recv()  # "stop"
        stop.set()
        t.join()
        pipe.send("stopped")


def _rate(work: Callable[[], None], seconds: float) -> float:
    """Calls of ``work`` per second over ``seconds``."""
    n = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        work()
        n += 1
    return n / (time.perf_counter() - start)


def _spin() -> None:
    x = 0
    for i in range(20_000):
        x += i


def bench(mib: int, seconds: float, repeat: int) -> dict[str, Any]:
    flat = flatten(_state(mib))
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(8)])
    x = torch.randn(32, 1024)

    def train_step() -> None:
        model(x).square().mean().backward()

    loops = {"training step": train_step, "python loop": _spin}
    writers = ("none", "thread", "thread, nice +10, io low", "process (shared memory)")
    rates: dict[str, dict[str, list[float]]] = {w: {k: [] for k in loops} for w in writers}
    shared = {k: t.clone().share_memory_() for k, t in flat.tensors.items()}
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        roots = {w: Path(tmp) / str(i) for i, w in enumerate(writers)}
        for root in roots.values():
            create_run(root)
        parent, child = ctx.Pipe()
        target = str(roots["process (shared memory)"])
        proc = ctx.Process(target=_process_main, args=(target, shared, flat.skeleton, child))
        proc.start()
        assert parent.recv() == "ready"
        for _ in range(repeat):
            for w in writers:  # interleaved: a change of the machine's load hits all alike
                for name, loop in loops.items():
                    stop = threading.Event()
                    thread = None
                    if w.startswith("thread"):
                        args = (roots[w], flat, stop, "nice" in w)
                        thread = threading.Thread(target=_writer_loop, args=args)
                        thread.start()
                    elif w.startswith("process"):
                        parent.send("go")
                    time.sleep(0.2)  # the writer is under way
                    rates[w][name].append(_rate(loop, seconds))
                    stop.set()
                    if thread is not None:
                        thread.join()
                    elif w.startswith("process"):
                        parent.send("stop")
                        assert parent.recv() == "stopped"
        parent.send("exit")
        proc.join()
    nbytes = sum(t.numel() * t.element_size() for t in shared.values())
    out: dict[str, Any] = {"state_mib": nbytes / 2**20, "loop_rate_vs_no_writer": {}}
    for w in writers:
        out["loop_rate_vs_no_writer"][w] = {
            name: statistics.median(rates[w][name]) / statistics.median(rates["none"][name])
            for name in loops
        }
    out["gil"] = gil_share(flat)
    return out


def gil_share(flat: Flattened) -> dict[str, float]:
    """The rate a Python thread keeps while each stage of a write runs in another thread."""
    big = max(flat.tensors.values(), key=lambda t: t.numel())
    view = memoryview(big.numpy()).cast("B")  # type: ignore[arg-type]
    dst = torch.empty_like(big)
    stages: dict[str, Callable[[], object]] = {
        "xxh3_128 hash": lambda: xxhash.xxh3_128_hexdigest(view),
        "copy_ into host buffer": lambda: dst.copy_(big),
        "file write": lambda: _write(view),
    }
    free = _rate(_spin, 0.5)
    out = {}
    for name, stage in stages.items():
        stop = threading.Event()

        def busy(stage: Callable[[], object] = stage, stop: threading.Event = stop) -> None:
            while not stop.is_set():
                stage()

        t = threading.Thread(target=busy)
        t.start()
        out[name] = _rate(_spin, 0.5) / free
        stop.set()
        t.join()
    return out


def _write(view: memoryview) -> None:
    with tempfile.TemporaryFile() as f:
        f.write(view)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(bench(args.mib, args.seconds, args.repeat), indent=2))


if __name__ == "__main__":
    main()
