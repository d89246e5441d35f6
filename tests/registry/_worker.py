"""A process that writes to a registry, for the concurrency and crash tests.

``python _worker.py both REGISTRY NAME SEED COUNT V1,V2,...``: COUNT versions of NAME (distinct
weights), printing each version, each followed by a move of ``base@production`` to one of the
versions. ``churn REGISTRY NAME MB``: registers and deletes versions with
an MB-sized frozen part (stored once) and a new 1 MB head each, until killed. Every process waits for ``REGISTRY.go`` to exist before
it starts, so that they all start writing at once.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

import torchkeep as tk


def _wait(root: str) -> None:
    go = Path(root + ".go")
    while not go.exists():
        time.sleep(0.01)


def main(argv: list[str]) -> None:
    kind, root, name = argv[:3]
    reg = tk.Registry(root)
    if kind == "both":  # registers versions of NAME, moves "production" of "base"
        seed, count, versions = int(argv[3]), int(argv[4]), argv[5].split(",")
        _wait(root)
        for i in range(count):
            state = {"w": torch.full((64,), float(seed * 1000 + i)), "b": torch.zeros(8)}
            print(reg.register(name, state, metadata={"seed": seed, "i": i}).version, flush=True)
            reg.set_alias("base", "production", versions[(i + seed) % len(versions)])
    elif kind == "churn":
        frozen = torch.randn(int(float(argv[3]) * 2**18))  # MB of float32
        print("ready", flush=True)
        i = 0
        while True:
            head = torch.full((2**18,), float(i))  # 1 MB written by every register
            v = reg.register(name, {"frozen": frozen, "head": head})
            if i % 2:
                reg.delete(name, v.version)
            i += 1


if __name__ == "__main__":
    main(sys.argv[1:])
