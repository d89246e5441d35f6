"""Deployment formats with proof: ONNX, torch.export (``.pt2``) and TorchScript.

:func:`export` writes the artifact, loads it back from its file, runs it on the example inputs
and other batch sizes, compares every output with the eager model, and only then moves it into
place; :class:`ExportReport` holds the numbers. :func:`load_exported` loads an artifact without
the model's code, refusing files that would run code unless trusted.
"""

from torchkeep._export._api import export
from torchkeep._export._load import load_exported
from torchkeep._export._onnx import OnnxModel
from torchkeep._export._report import ExportReport, InputSpec, OutputCheck

__all__ = ["ExportReport", "InputSpec", "OnnxModel", "OutputCheck", "export", "load_exported"]
