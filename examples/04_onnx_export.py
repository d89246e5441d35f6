"""Tutorial chapter 4, exporting to ONNX, the torchkeep way.

``torch.onnx.export(model, example, path)`` fixes every input dimension to the example's: the
file then refuses any other batch size or sequence length in ONNX Runtime, and nothing checked
that it computes what the model computes. ``tk.export`` leaves the batch dimension dynamic (and the
ones you name), loads the file back in ONNX Runtime, runs it on the example and on other batch and
sequence sizes, compares every output with the eager model, and only then moves it into place.

Run: python examples/04_onnx_export.py [WORKDIR]   (needs the onnx extra: onnx, onnxruntime)
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

import torchkeep as tk


class TextClassifier(nn.Module):
    """Token ids (batch, seq) to class scores: both dimensions vary in deployment."""

    def __init__(self, vocab: int = 100, width: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.encode = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width))
        self.head = nn.Linear(width, classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(self.embed(input_ids)).mean(dim=1))


def main(workdir: Path) -> None:
    torch.manual_seed(0)
    model = TextClassifier().eval()
    example = torch.randint(0, 100, (2, 7))

    print("== the plain way: torch.onnx.export without dynamic shapes")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # torchvision-missing notices
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), workdir / "plain.onnx")
    plain = ort.InferenceSession(workdir / "plain.onnx", providers=["CPUExecutionProvider"])
    print(f"plain.onnx input shape: {plain.get_inputs()[0].shape}")
    try:
        plain.run(None, {plain.get_inputs()[0].name: np.zeros((3, 7), dtype=np.int64)})
        print("plain.onnx ran a batch of 3")
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
        print(f"plain.onnx on a batch of 3: {type(err).__name__}: {str(err).splitlines()[0]}")

    print("== the torchkeep way: dynamic batch and sequence, verified in ONNX Runtime")
    report = tk.export(
        model, (example,), workdir / "model.onnx", dynamic_dims={"input_ids": {1: "seq"}}
    )
    print(report.summary())
    print(f"dynamic axes of input_ids: {report.inputs[0].dynamic}")
    ok = all(check.ok for check in report.checks)
    print(
        f"export verified: {'yes' if ok else 'NO'} ({len(report.checks)} checks, {report.runtime})"
    )

    # The verified file, used directly, on shapes it never saw.
    session = ort.InferenceSession(workdir / "model.onnx", providers=["CPUExecutionProvider"])
    print(f"model.onnx input shape: {session.get_inputs()[0].shape}")
    ids = torch.randint(0, 100, (5, 11))
    (scores,) = session.run(None, {session.get_inputs()[0].name: ids.numpy()})
    with torch.no_grad():
        eager = model(ids).numpy()
    err = float(np.abs(scores - eager).max())
    print(f"onnxruntime on batch 5, seq 11: shape {scores.shape}, max abs error {err:.2e}")
    close = np.allclose(scores, eager, rtol=1e-5, atol=1e-5)
    print(f"matches the eager model: {'yes' if close else 'NO'}")

    # A failed verification writes nothing: tolerances this tight no float export can meet.
    try:
        tk.export(model, (example,), workdir / "strict.onnx", rtol=0.0, atol=0.0)
        print("an exact-match export verified")
    except tk.ExportVerificationError as failure:
        worst = max(c.max_abs_error or 0.0 for c in failure.report.checks)
        written = (workdir / "strict.onnx").exists()
        print(
            f"rtol=atol=0: ExportVerificationError (max abs error {worst:.2e}), written: {written}"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
