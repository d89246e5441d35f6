"""Fixtures of the CLI tests: a clean output environment and a CliRunner."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from ._helpers import TERMINAL_ENV


@pytest.fixture(autouse=True)
def piped_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts as if stdout were piped, whatever the CI environment sets."""
    for name in TERMINAL_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def terminal_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make rich treat stdout as a wide terminal."""
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("COLUMNS", "200")


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()
