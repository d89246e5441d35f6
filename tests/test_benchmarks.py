"""Smoke test of the benchmark suite: ``benchmarks/run.py --quick`` runs and writes its JSON.

No timing is asserted: only that every section is there and every ratio is a finite positive number.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = (
    "machine",
    "page_cache",
    "repeat",
    "sizes",
    "train_loop",
    "finetune",
    "distributed",
    "targets",
    "ratios",
)


def test_quick_benchmark_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,  # a loaded 2-core machine; the distributed part starts 2 processes
        cwd=tmp_path,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"benchmark failed:\n{result.stdout}\n{result.stderr}")
    doc = json.loads(out.read_text())
    for section in SECTIONS:
        assert section in doc, section
    size = doc["sizes"][0]
    for part in ("save_seconds", "load_seconds", "rss_growth_mib", "hash_bytes_per_s"):
        assert size[part], part
    assert "CheckpointManager (async)" in doc["train_loop"]["ways"]
    assert doc["targets"] and all(isinstance(t["pass"], bool) for t in doc["targets"])
    assert doc["ratios"]
    for name, value in doc["ratios"].items():
        assert isinstance(value, int | float) and math.isfinite(value), (name, value)
        # A loop overhead or the memory above the loop can vanish in the noise of a short run
        # (clamped at 0); times cannot.
        assert value >= 0 if "overhead" in name or "memory" in name else value > 0, (name, value)
    assert "PASS" in result.stdout or "MISS" in result.stdout
