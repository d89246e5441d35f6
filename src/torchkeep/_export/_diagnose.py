"""Turning an exporter's failure into an :class:`ExportError` that says where and what to try.

Exporters fail deep inside torch with pages of text. What a user needs: which submodule (and
line of their code) the exporter choked on, which step failed, and what to try instead. The
submodule is found in the failure's traceback: the innermost frame whose ``self`` is one of the
model's modules (torch.export runs ``forward`` for real), or an FX node whose metadata records
its module stack and source line (ONNX decomposition and translation work on the graph).
"""

from __future__ import annotations

import re
import types
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from torchkeep.errors import ExportError, strip_ansi

__all__ = ["diagnose"]

_ONNX_STEPS = {
    "1": "capturing the model with torch.export",
    "2": "decomposing the graph for ONNX",
    "3": "translating the graph to ONNX operators",
}
_MAX_DETAIL = 600


@dataclass(frozen=True)
class Where:
    module: str  # "block.1 (Gate)"
    line: str | None  # "model.py:12: return x * (1.0 - mask)"


def _frames(exc: BaseException) -> Iterator[tuple[types.FrameType, int]]:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        tb = e.__traceback__
        while tb is not None:
            yield tb.tb_frame, tb.tb_lineno
            tb = tb.tb_next
        e = e.__cause__ or e.__context__


def _user_line(stack_trace: str) -> str | None:
    """The last ``File ..., line N`` entry of an FX node's stack trace, with its code."""
    found = re.findall(r'File "([^"]+)", line (\d+), in \w+\n\s*(.*)', stack_trace)
    if not found:
        return None
    file, line, code = found[-1]
    return f"{file}:{line}: {code.strip()}"


def locate(model: nn.Module, exc: BaseException) -> Where | None:
    """The innermost submodule of ``model`` the failure happened in, when one can be found."""
    names = {id(m): name for name, m in model.named_modules()}
    found: Where | None = None
    for frame, lineno in _frames(exc):
        this = frame.f_locals.get("self")
        if isinstance(this, nn.Module) and id(this) in names:
            code = frame.f_code.co_filename
            if "/torch/" not in code:  # the user's forward, not nn.Module's __call__
                name = names[id(this)] or "<root>"
                found = Where(f"{name} ({type(this).__name__})", f"{code}:{lineno}")
        for value in frame.f_locals.values():
            if isinstance(value, torch.fx.Node) and value.meta.get("nn_module_stack"):
                path, cls = list(value.meta["nn_module_stack"].values())[-1]
                cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
                found = Where(
                    f"{path or '<root>'} ({cls_name.rsplit('.', 1)[-1]})",
                    _user_line(value.meta.get("stack_trace") or ""),
                )
    return found


def _first_lines(text: str) -> str:
    """The exception's own message without the exporter's boilerplate, shortened."""
    text = strip_ansi(text)
    if "## Exception summary" in text:
        text = text.split("## Exception summary", 1)[1]
    text = re.sub(r"\n\s*\n", "\n", text).strip()
    return text if len(text) <= _MAX_DETAIL else text[:_MAX_DETAIL] + " [...]"


def diagnose(exc: BaseException, model: nn.Module, *, fmt: str, during: str) -> ExportError:
    """An :class:`ExportError` naming the step, the submodule and the way out."""
    raw = strip_ansi(f"{type(exc).__name__}: {exc}")
    where = locate(model, exc)
    step = during
    match = re.search(r"This is step (\d)/3", raw)
    if fmt == "onnx" and match:
        step = f"step {match.group(1)}/3 of the ONNX export ({_ONNX_STEPS[match.group(1)]})"
    module = where.module if where else type(model).__name__
    at = f" in {module}" + (f" at {where.line}" if where and where.line else "")
    others = {
        "onnx": "format='pt2'",
        "pt2": "format='onnx'",
        "torchscript": "format='pt2' or format='onnx'",
    }[fmt]

    if fmt == "onnx" and "compatible OpOverload for aten.sub" in raw:
        return ExportError(
            f"{step} failed{at}: the ONNX exporter of torch {torch.__version__} cannot "
            "translate a Python number minus an integer tensor (e.g. `1.0 - attention_mask`)",
            module=module,
            step=step,
            hint="export with format='pt2' (torch.export handles it), or make the tensor "
            "floating point first: `1.0 - attention_mask.float()`",
        )
    if "data-dependent" in raw or "GuardOnDataDependentSymNode" in raw:
        return ExportError(
            f"{step} failed{at}: data-dependent control flow (a Python `if` or loop on a "
            "tensor's values) cannot be captured as one graph",
            module=module,
            step=step,
            hint="rewrite it with torch.where or torch.cond, or export with "
            "format='torchscript', method='script', which keeps Python control flow",
        )
    if "Constraints violated" in raw or ("specialized" in raw and "Dim" in raw):
        return ExportError(
            f"{step} failed{at}: the model's code fixes a dimension that was asked to be "
            f"dynamic: {_first_lines(str(exc))}",
            module=module,
            step=step,
            hint="remove the hard-coded size (e.g. x.view(2, -1) -> x.view(x.shape[0], -1)), "
            "or pass dynamic_batch=False / drop that entry of dynamic_dims",
        )
    return ExportError(
        f"{step} failed{at}: {_first_lines(str(exc))}",
        module=module,
        step=step,
        hint=f"an operator or construct this exporter does not support: try {others}"
        + (", or another opset" if fmt == "onnx" else ""),
    )
