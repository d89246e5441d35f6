"""Starting the ranks of a test job as real processes, as torchrun would."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

WORKERS = Path(__file__).with_name("_workers.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(
    scenario: str,
    out: Path,
    world_size: int = 2,
    timeout: float = 120,
    workers: Path = WORKERS,
) -> list[Any]:
    """Run ``scenario`` on ``world_size`` ranks; each rank's JSON result (None if it died)."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(workers), scenario, str(out)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    logs = [p.communicate(timeout=timeout)[0].decode(errors="replace") for p in procs]
    results = []
    for rank in range(world_size):
        path = out / f"rank{rank}.json"
        results.append(json.loads(path.read_text()) if path.exists() else None)
        if results[-1] and "error" in results[-1]:
            raise AssertionError(f"rank {rank} failed:\n{results[-1]['error']}\n{logs[rank]}")
    return results
