"""Save/load benchmark: torchkeep against torch.save and safetensors on the same state, in one run.

Usage: python benchmarks/run.py [--mib 256] [--repeat 3] [--json results.json]

Prints a table of median times (and ratios to torch.save / torch.load) and the peak RSS growth
of ``load_into`` against ``torch.load`` + ``load_state_dict``, each measured in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import safetensors.torch
import torch

import torchkeep as tk

RSS_PROBE = r"""
import sys, torch, torchkeep as tk

def status(field):  # VmRSS now, VmHWM peak; ru_maxrss would include the parent's peak
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024

mib, path, how = int(sys.argv[1]), sys.argv[2], sys.argv[3]
with torch.device("meta"):
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(mib // 4)])
model = model.to_empty(device="cpu")
for p in model.parameters():
    p.data.zero_()  # touch the pages so that the model itself is resident
before = max(status("VmRSS"), status("VmHWM"))
if how == "torchkeep":
    tk.load_into(model, path)
else:
    model.load_state_dict(torch.load(path, weights_only=True))
print(status("VmHWM") - before)
"""


def median_time(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=256, help="state size in MiB (multiple of 4)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args()

    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(args.mib // 4)])
    state = model.state_dict()
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)

        def torch_save_fsync() -> None:
            with open(d / "torch-fsync.pt", "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())

        saves: dict[str, Callable[[], object]] = {
            "torch.save": lambda: torch.save(state, d / "torch.pt"),
            "torch.save + fsync": torch_save_fsync,
            "safetensors.save_file": lambda: safetensors.torch.save_file(
                state, d / "st.safetensors"
            ),
            "torchkeep.save (.safetensors)": lambda: tk.save(state, d / "tk.safetensors"),
            "torchkeep.save (.pt)": lambda: tk.save(state, d / "tk.pt"),
        }
        for name, fn in saves.items():
            results[f"save: {name}"] = median_time(fn, args.repeat)

        def touch(obj: dict[str, torch.Tensor]) -> None:
            for t in obj.values():
                t.sum()

        loads: dict[str, Callable[[], object]] = {
            "torch.load": lambda: touch(torch.load(d / "torch.pt", weights_only=True)),
            "torch.load mmap": lambda: touch(
                torch.load(d / "torch.pt", weights_only=True, mmap=True)
            ),
            "safetensors.load_file": lambda: touch(
                safetensors.torch.load_file(d / "st.safetensors")
            ),
            "torchkeep.load": lambda: touch(tk.load(d / "tk.safetensors")),
        }
        for name, fn in loads.items():
            results[f"load: {name}"] = median_time(fn, args.repeat)
        for how, path in (("torch", d / "torch.pt"), ("torchkeep", d / "tk.safetensors")):
            out = subprocess.run(
                [sys.executable, "-c", RSS_PROBE, str(args.mib), str(path), how],
                capture_output=True,
                text=True,
                check=True,
            )
            results[f"peak RSS growth MiB: load into model ({how})"] = float(out.stdout.strip())

    print(f"state: {args.mib} MiB, torch {torch.__version__}, torchkeep {tk.__version__}")
    base_save, base_load = results["save: torch.save"], results["load: torch.load"]
    for name, value in results.items():
        if name.startswith("save"):
            print(f"{name:45s} {value:8.3f} s  {value / base_save:5.2f}x torch.save")
        elif name.startswith("load"):
            print(f"{name:45s} {value:8.3f} s  {value / base_load:5.2f}x torch.load")
        else:
            print(f"{name:45s} {value:8.1f}    {value / args.mib:5.2f}x state size")
    if args.json:
        args.json.write_text(json.dumps({"mib": args.mib, "results": results}, indent=2))


if __name__ == "__main__":
    main()
