"""Tutorial chapter 5, TorchScript (tracing against scripting) and torch.export, the torchkeep way.

``torch.jit.trace`` records the operations one example input ran: a Python ``if`` on a tensor's
values is baked in as the branch that example took. The trace then computes something else on
inputs that would take the other branch, and nothing fails: only a ``TracerWarning``, easy to miss
in a log, says the trace "might not generalize". ``tk.export`` runs every artifact it writes
against the eager model on the example and on other batch sizes, so the baked-in branch is caught
before a file exists. Scripting keeps the branch; ``torch.export`` refuses it and asks for
``torch.where``/``torch.cond``, after which it verifies.

Run: python examples/05_torchscript_export.py [WORKDIR]
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

import torchkeep as tk


class Rescale(nn.Module):
    """Scales its input down only when it is large: a branch on the input's values."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        peak = x.abs().max()
        if peak > 10.0:  # data-dependent: a trace keeps whichever branch its example took
            x = x / peak
        return self.proj(x)


class RescaleWhere(Rescale):
    """The same computation without Python control flow: torch.export can capture it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        peak = x.abs().max()
        return self.proj(torch.where(peak > 10.0, x / peak, x))


def main(workdir: Path) -> None:
    torch.manual_seed(0)
    model = Rescale().eval()
    # Row 0 is small, row 1 holds one large value: the batch takes the "rescale" branch.
    example = torch.tensor([[0.5, -1.0, 2.0, 0.1], [3.0, 50.0, -2.0, 1.0]])
    small = example[:1]  # on its own it takes the other branch

    print("== the plain way: torch.jit.trace")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(model, (example,))
    names = sorted({type(w.message).__name__ for w in caught})
    print(f"torch.jit.trace raised no error; warnings: {', '.join(names) or 'none'}")
    with torch.no_grad():
        eager_small, traced_small = model(small), traced(small)
    error = float((eager_small - traced_small).abs().max())
    print(f"trace on a small input: max abs error against eager {error:.3f} (silently wrong)")

    print("== tk.export(method='trace'): verification catches the baked-in branch")
    try:
        tk.export(model, (example,), workdir / "traced.pt", method="trace")
        print("the trace verified")
    except tk.ExportVerificationError as err:
        failed = [c.case for c in err.report.checks if not c.ok]
        print(f"ExportVerificationError: mismatch on {', '.join(failed)}")
        print(f"traced.pt written: {(workdir / 'traced.pt').exists()}")

    print("== tk.export(method='script'): scripting keeps the branch")
    report = tk.export(model, (example,), workdir / "scripted.pt", method="script")
    print(report.summary())
    # A TorchScript archive carries code, so loading it needs trust=True: we wrote it just now.
    scripted = tk.load_exported(workdir / "scripted.pt", trust=True)
    with torch.no_grad():
        same = torch.allclose(scripted(small), eager_small)
    print(f"scripted model on the small input matches eager: {'yes' if same else 'NO'}")

    print("== torch.export (.pt2): refuses data-dependent control flow, with the way out")
    try:
        tk.export(model, (example,), workdir / "rescale.pt2")
    except tk.ExportError as err:
        message = str(err).splitlines()
        print(f"ExportError: {message[0]}")
        print(message[-1].strip())
    where = RescaleWhere().eval()
    where.load_state_dict(model.state_dict())
    report = tk.export(where, (example,), workdir / "rescale_where.pt2")
    print(report.summary())
    exported = tk.load_exported(workdir / "rescale_where.pt2")
    with torch.no_grad():
        same = torch.allclose(exported(small), eager_small) and torch.allclose(
            exported(example), model(example)
        )
    print(
        f"torch.export with torch.where matches eager on both branches: {'yes' if same else 'NO'}"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
