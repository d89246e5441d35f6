"""The README's "Runs on S3" shell block, run as a user would, against the tests' moto server.

The block starts ``moto_server -p 5000`` itself; here the session's server stands in for it (its
port replaces 5000), and a fresh bucket replaces ``my-bucket``. Everything else runs as written,
through bash, with this environment's ``python`` and ``torchkeep`` first on ``PATH``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import s3fs

from tests.test_doc_blocks import ROOT, blocks


def test_the_readme_s3_block_runs_against_a_real_server(s3_endpoint: str, tmp_path: Path) -> None:
    (block,) = [b for b in blocks(ROOT / "README.md") if b.needs_s3]
    bucket = f"tk-readme-{uuid.uuid4().hex[:8]}"
    lines = [
        line
        for line in block.body.splitlines()
        if not line.startswith(("pip install", "moto_server "))  # the fixture is the server
    ]
    assert len(lines) == len(block.body.splitlines()) - 2, "the block's set-up lines changed"
    script = "\n".join(lines).replace("http://127.0.0.1:5000", s3_endpoint)
    script = script.replace("my-bucket", bucket)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    manifests = [p for p in fs.ls(f"{bucket}/exp1/checkpoints") if p.endswith(".json")]
    assert [Path(p).name for p in manifests] == ["0000000004.json"], "prune --keep-last 1"
