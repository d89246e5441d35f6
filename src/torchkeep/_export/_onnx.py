"""ONNX: translate an ``ExportedProgram`` with torch's dynamo exporter, check, run in ONNX Runtime.

Decisions taken here rather than left to torch's defaults:

* ``verbose=False``: torch otherwise prints progress lines to stdout.
* External data is decided explicitly: inline below :data:`EXTERNAL_DATA_BYTES` of weights,
  else ``x.onnx.data`` beside ``x.onnx``; the two are one artifact.
* The opset written is read back: a requested opset that the exporter replaced is an error.
* torch's ``verify=True`` compares against the exported program and only warns; verification
  here runs the saved file in ONNX Runtime against the eager model instead.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchkeep._export._inputs import Inputs
from torchkeep.errors import ExportError

__all__ = ["EXTERNAL_DATA_BYTES", "OnnxModel", "check_file", "require", "write"]

# ONNX files are protobufs, limited to 2 GiB; torch switches to external data at 1.5 GiB.
EXTERNAL_DATA_BYTES = 1536 << 20
_LOCAL_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
_EXTRA_HINT = "install the extra: pip install 'torchkeep[onnx]'"


def require() -> tuple[Any, Any]:
    """The ``onnx`` and ``onnxruntime`` modules, or an error naming the extra to install."""
    try:
        return importlib.import_module("onnx"), importlib.import_module("onnxruntime")
    except ImportError as exc:
        raise ExportError(
            f"ONNX export needs onnx, onnxruntime and onnxscript: {exc}", hint=_EXTRA_HINT
        ) from exc


def write(
    program: torch.export.ExportedProgram,
    inputs: Inputs,
    path: Path,
    *,
    opset: int | None,
    external_data: bool | None,
) -> tuple[list[Path], int, list[str]]:
    """Translate ``program`` and save it at ``path``.

    Returns:
        The files written (``path``, then ``path.data`` when external), the opset, and notes.
    """
    require()
    importlib.import_module("onnxscript")
    onnx_program = torch.onnx.export(
        program,
        inputs.args,
        kwargs=inputs.kwargs or None,
        dynamo=True,
        verbose=False,
        opset_version=opset,
        optimize=True,
    )
    assert onnx_program is not None
    written = _opset(onnx_program.model_proto)
    if opset is not None and written != opset:
        raise ExportError(
            f"opset {opset} was asked for, but the exporter wrote opset {written}",
            hint=f"export with opset={written}, or an opset this torch's exporter supports",
        )
    weights = sum(t.numel() * t.element_size() for t in program.state_dict.values())
    weights += sum(
        t.numel() * t.element_size()
        for t in program.constants.values()
        if isinstance(t, torch.Tensor)
    )
    notes = []
    if external_data is None:
        external_data = weights >= EXTERNAL_DATA_BYTES
        if external_data:
            notes.append(
                f"weights ({weights / 2**30:.2f} GiB) are over the inline limit: they are in "
                f"{path.name}.data, which must stay beside {path.name}"
            )
    onnx_program.save(path, external_data=external_data)
    files = [path]
    data = path.with_name(path.name + ".data")
    if data.exists():
        files.append(data)
    return files, written, notes


def _opset(model: Any) -> int:
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def check_file(path: Path) -> int:
    """``onnx.checker`` with shape inference on the saved file (external data included);
    returns the opset."""
    onnx, _ = require()
    try:
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ExportError(
            f"onnx.checker rejects the exported model: {exc}",
            hint="try another opset, or format='pt2'",
        ) from exc
    return _opset(model)


def symbolic_inputs(path: Path) -> list[dict[int, bool]]:
    """Per graph input, dimension -> whether it is symbolic (``dim_param``)."""
    onnx, _ = require()
    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    return [
        {d: bool(dim.dim_param) for d, dim in enumerate(i.type.tensor_type.shape.dim)}
        for i in model.graph.input
        if i.name not in initializers
    ]


class OnnxModel:
    """An ONNX file run by ONNX Runtime, called with torch tensors like the model it came from.

    Returns the list of outputs (ONNX flattens nested outputs and drops ``None``).
    """

    def __init__(
        self, path: str | Path, providers: list[str] | None = None, *, spinning: bool = True
    ) -> None:
        _, ort = require()
        self.path = Path(path)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if not spinning:  # idle threads that spin would steal the CPU from other measurements
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if providers is None:  # never Azure's remote provider, which some builds list first
            available = ort.get_available_providers()
            providers = [p for p in _LOCAL_PROVIDERS if p in available]
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __repr__(self) -> str:
        return f"OnnxModel({str(self.path)!r}, inputs={self.input_names})"

    def __call__(self, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        tensors = Inputs(args, kwargs).tensors()
        if len(tensors) != len(self.input_names):
            raise ExportError(
                f"the ONNX model takes {len(self.input_names)} tensor input(s) "
                f"{self.input_names}, got {len(tensors)}",
                path=str(self.path),
                hint="pass the same inputs as to the model's forward",
            )
        feed = {name: _numpy(t) for name, t in zip(self.input_names, tensors, strict=True)}
        return [torch.from_numpy(np.asarray(o)) for o in self.session.run(None, feed)]


def _numpy(t: torch.Tensor) -> np.ndarray[Any, Any]:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        raise ExportError(
            "numpy, hence ONNX Runtime's Python API, has no bfloat16 inputs",
            hint="export with float32 or float16 example inputs",
        )
    return t.contiguous().numpy()
