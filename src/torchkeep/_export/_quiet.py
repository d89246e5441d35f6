"""Keeping exporters quiet: their prints, log lines and warnings would break ``--json`` output
and bury the report. What they say is collected instead, and the useful part becomes notes."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator

__all__ = ["quiet"]

_LOGGERS = ("torch", "onnxscript", "onnx_ir", "onnx")
# Warnings about torch's and its dependencies' own code, not about the user's model.
_NOISE = (DeprecationWarning, FutureWarning, PendingDeprecationWarning, ImportWarning)


@contextlib.contextmanager
def quiet(notes: list[str]) -> Iterator[None]:
    """Silence stdout, stderr, the exporters' loggers and warnings for the duration; append the
    distinct user-relevant warnings to ``notes``."""
    manager = logging.Logger.manager
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    loggers += [
        logger
        for name, logger in list(manager.loggerDict.items())
        if isinstance(logger, logging.Logger) and name.startswith(tuple(n + "." for n in _LOGGERS))
    ]
    levels = [(logger, logger.level) for logger in loggers]
    caught: list[warnings.WarningMessage] = []
    try:
        for logger in loggers:
            logger.setLevel(logging.CRITICAL)  # failures are raised, with what matters
        with (
            warnings.catch_warnings(record=True) as recorded,
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),  # torch.export prints partial graphs
        ):
            warnings.simplefilter("always")
            caught = recorded
            yield
    finally:
        for logger, level in levels:
            logger.setLevel(level)
        seen = set(notes)
        for w in caught:
            if issubclass(w.category, _NOISE):
                continue
            text = f"{w.category.__name__}: {str(w.message).strip().splitlines()[0][:300]}"
            if text not in seen and len(seen) < 20:
                seen.add(text)
                notes.append(text)
