"""Transfer progress bars: fed by the remote store's reports, drawn only on a terminal, late."""

from __future__ import annotations

import io
import uuid

import torch
from rich.console import Console

import torchkeep as tk
from torchkeep.cli._transfers import TransferBars
from torchkeep.storage import observe_transfers


def test_uploads_and_downloads_are_reported_and_drawn_on_a_terminal() -> None:
    out = io.StringIO()
    bars = TransferBars(Console(file=out, force_terminal=True, width=100), after=0.0)
    seen: list[tuple[str, int]] = []
    url = f"memory://tk-{uuid.uuid4().hex[:8]}/w.safetensors"
    with observe_transfers(bars), observe_transfers(lambda k, p, n, t: seen.append((k, n))):
        tk.save({"w": torch.zeros(1000)}, url)
        assert torch.equal(tk.load(url)["w"], torch.zeros(1000))
    bars.close()
    assert {k for k, _ in seen} == {"upload", "download"}
    assert sum(n for k, n in seen if k == "upload") > 4000
    assert "w.safetensors" in out.getvalue()


def test_nothing_is_drawn_when_piped_or_quick() -> None:
    piped = io.StringIO()
    bars = TransferBars(Console(file=piped, force_terminal=False), after=0.0)
    bars("upload", "memory://x/y", 10, 100)
    quick = io.StringIO()
    late = TransferBars(Console(file=quick, force_terminal=True), after=60.0)
    late("upload", "memory://x/y", 10, 100)
    bars.close()
    late.close()
    assert piped.getvalue() == "" and quick.getvalue() == ""
