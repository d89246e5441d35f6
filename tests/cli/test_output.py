"""The output helpers every command shares: tables, JSON, sizes and error reporting."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import pytest
import torch
import typer
from typer.testing import CliRunner

import torchkeep as tk
from torchkeep.cli._errors import handle_errors
from torchkeep.cli._output import (
    Column,
    compact_json,
    emit_json,
    format_shape,
    human_bytes,
    print_kv,
    print_table,
)
from torchkeep.errors import CorruptCheckpointError

from ._helpers import ANSI, BOX


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (int(1.2 * 1024**2), "1.2 MiB"),
        (5 * 1024**3, "5.0 GiB"),
        (3 * 1024**5, "3.0 PiB"),
        (2048 * 1024**5, "2048.0 PiB"),
    ],
)
def test_human_bytes(n: int, text: str) -> None:
    assert human_bytes(n) == text


def test_format_shape_and_compact_json() -> None:
    assert format_shape((3, 4)) == "(3, 4)"
    assert format_shape(()) == "()"
    assert compact_json("plain text") == "plain text"
    assert compact_json({"a": [1, 2], "b": None}) == '{"a":[1,2],"b":null}'
    assert compact_json(0.5) == "0.5"


def test_emit_json_handles_tuples_paths_and_non_finite(capsys: pytest.CaptureFixture[str]) -> None:
    emit_json({"shape": (2, 3), "path": Path("/x/y"), "loss": float("nan"), "tags": {"b", "a"}})
    out = capsys.readouterr().out
    assert json.loads(out) == {"shape": [2, 3], "path": "/x/y", "loss": "nan", "tags": ["a", "b"]}
    assert out.startswith('{\n  "shape"')  # indent 2, keys in their order


def test_emit_json_converts_reports_all_the_way_down(capsys: pytest.CaptureFixture[str]) -> None:
    class Report:
        def to_dict(self) -> dict[str, object]:
            return {"where": Path("a/b"), "loss": float("inf"), "shape": (1,)}

    emit_json({"reports": [Report()], 3: None})
    data = json.loads(capsys.readouterr().out)
    assert data == {"reports": [{"where": "a/b", "loss": "inf", "shape": [1]}], "3": None}


def test_plain_table_is_aligned_without_box_or_ansi(capsys: pytest.CaptureFixture[str]) -> None:
    print_table(
        [Column("name"), Column("bytes", justify="right")],
        [("a.weight", "1.0 KiB"), ("bias", None)],
        title="tensors",
    )
    out = capsys.readouterr().out
    assert out.splitlines() == [
        "tensors",
        "name        bytes",
        "a.weight  1.0 KiB",
        "bias            -",
    ]
    assert not ANSI.search(out)
    assert not BOX.search(out)


def test_plain_kv(capsys: pytest.CaptureFixture[str]) -> None:
    print_kv([("format", "safetensors"), ("format version", None)])
    assert capsys.readouterr().out.splitlines() == [
        "format          safetensors",
        "format version  -",
    ]


@pytest.mark.usefixtures("terminal_env")
def test_terminal_table_is_a_rich_table(capsys: pytest.CaptureFixture[str]) -> None:
    print_table(["name", "value"], [("[bold]x[/bold]", 1)])
    out = capsys.readouterr().out
    assert BOX.search(out)
    assert "[bold]x[/bold]" in out  # cells are text, never rich markup


# --- error handling --------------------------------------------------------------------------


def _app(exc: BaseException) -> typer.Typer:
    app = typer.Typer()

    @app.command()
    @handle_errors
    def fail(name: str = "x") -> None:
        """A command that raises ``exc``."""
        raise exc

    @app.command()
    def other() -> None:  # a second command makes `fail` a subcommand, as in the real app
        """Nothing."""

    return app


def test_torchkeep_error_prints_name_and_message_and_exits_1(runner: CliRunner) -> None:
    err = tk.TorchkeepError("bad bytes", path="/data/x.pt", hint="save it again")
    result = runner.invoke(_app(err), ["fail"])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == "TorchkeepError: /data/x.pt: bad bytes\n  hint: save it again\n"


def test_subclass_name_is_printed(runner: CliRunner) -> None:
    err = CorruptCheckpointError("truncated header", key="model.weight")
    result = runner.invoke(_app(err), ["fail"])
    assert result.exit_code == 1
    assert result.stderr == (
        "CorruptCheckpointError: truncated header\n"
        "  hint: the file is damaged, truncated or was altered; restore it from a copy\n"
    )


@pytest.mark.parametrize(("module", "extra"), [("matplotlib.pyplot", "plot"), ("onnx", "onnx")])
def test_missing_extra_prints_install_hint(runner: CliRunner, module: str, extra: str) -> None:
    err = ModuleNotFoundError(f"No module named '{module}'", name=module)
    result = runner.invoke(_app(err), ["fail"])
    assert result.exit_code == 1
    assert result.stderr.startswith("ModuleNotFoundError: No module named")
    assert f"pip install 'torchkeep[{extra}]'" in result.stderr


def test_other_errors_are_bugs_and_propagate(runner: CliRunner) -> None:
    result = runner.invoke(_app(RuntimeError("boom")), ["fail"])
    assert isinstance(result.exception, RuntimeError)
    unrelated = runner.invoke(_app(ImportError("x", name="somethingelse")), ["fail"])
    assert isinstance(unrelated.exception, ImportError)


def test_usage_errors_keep_exit_code_2(runner: CliRunner) -> None:
    result = runner.invoke(_app(RuntimeError("never")), ["fail", "--nope"])
    assert result.exit_code == 2


def _json_app(exc: BaseException) -> typer.Typer:
    app = typer.Typer()

    @app.command()
    @handle_errors
    def fail(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
        """A command with --json that raises ``exc``."""
        raise exc

    @app.command()
    def other() -> None:
        """Nothing."""

    return app


def test_json_failure_prints_an_error_document_and_exits_1(runner: CliRunner) -> None:
    err = CorruptCheckpointError("truncated header", path="/data/x.pt", key="w")
    result = runner.invoke(_json_app(err), ["fail", "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout) == {
        "error": "CorruptCheckpointError",
        "message": "truncated header",
        "hint": CorruptCheckpointError.default_hint,
        "path": "/data/x.pt",
        "key": "w",
    }
    assert result.stderr.startswith("CorruptCheckpointError: /data/x.pt: truncated header\n")
    plain = runner.invoke(_json_app(err), ["fail"])  # without --json: stderr only
    assert plain.exit_code == 1 and plain.stdout == ""
    missing = ModuleNotFoundError("No module named 'onnx'", name="onnx")
    extra = runner.invoke(_json_app(missing), ["fail", "--json"])
    assert extra.exit_code == 1
    assert json.loads(extra.stdout)["hint"] == "pip install 'torchkeep[onnx]'"


def test_json_failures_of_real_commands(runner: CliRunner, tmp_path: Path) -> None:
    from torchkeep.cli import app

    tk.save({"w": torch.zeros(2)}, tmp_path / "in.safetensors")
    cases = {
        ("inspect", str(tmp_path / "nope.pt")): ("CheckpointNotFoundError", 1),
        ("ls", str(tmp_path)): ("CheckpointNotFoundError", 1),
        ("convert", str(tmp_path / "in.safetensors"), str(tmp_path / "o.onnx")): (
            "InvalidArgumentError",
            1,
        ),
        ("convert", str(tmp_path / "in.safetensors"), "o.pt", "--dtype", "zz"): ("UsageError", 2),
        ("verify", "nosuch://bucket/run"): ("StorageError", 1),
    }
    for args, (name, code) in cases.items():
        result = runner.invoke(app, [*args, "--json"])
        assert result.exit_code == code, (args, result.output)
        document = json.loads(result.stdout)
        assert document["error"] == name and document["message"], args
        assert "hint" in document


def test_usage_errors_under_json_print_json_and_exit_2(tmp_path: Path) -> None:
    """What typer itself rejects (a missing argument, an unknown option) is JSON too."""
    from ._helpers import run_torchkeep

    for args, message in (
        (["inspect", "--json"], "Missing argument 'PATH'"),
        (["ls", str(tmp_path), "--bogus", "--json"], "No such option: --bogus"),
    ):
        result = run_torchkeep(*args)
        assert result.returncode == 2, result.stderr
        document = json.loads(result.stdout)
        assert document["error"] == "UsageError" and message in document["message"]
        assert document["hint"] == f"see torchkeep {args[0]} --help"
        assert message in result.stderr  # the usage text still goes to stderr
    plain = run_torchkeep("inspect")  # without --json: typer's own output, stdout empty
    assert plain.returncode == 2 and plain.stdout == ""
