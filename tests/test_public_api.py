"""The public surface: names, signatures and the error hierarchy users catch."""

from __future__ import annotations

import importlib
import inspect
from importlib.metadata import version

import pytest

import torchkeep

EXPECTED_ALL = [
    "AliasMove",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointPrunedError",
    "CheckpointRecord",
    "CleanupWarning",
    "Comparison",
    "ConfigMixin",
    "CorruptCheckpointError",
    "DiffReport",
    "DirectoryScan",
    "DistributedError",
    "ExportError",
    "ExportReport",
    "ExportVerificationError",
    "FileCheck",
    "FileInfo",
    "FormatVersionError",
    "IncompatibleStateError",
    "InvalidArgumentError",
    "Lineage",
    "LoadReport",
    "Mismatch",
    "ModelClassError",
    "ModelVersion",
    "OutputCheck",
    "PickleScan",
    "PrunePlan",
    "RNGState",
    "Registry",
    "RegistryError",
    "RegistryReport",
    "RestoreInfo",
    "RetentionPolicy",
    "RunLockedError",
    "SnapshotChangedError",
    "StorageError",
    "TensorComparison",
    "TensorDiff",
    "TensorInfo",
    "Tie",
    "TorchkeepError",
    "TorchkeepWarning",
    "UnsafeCheckpointError",
    "UnsupportedValueError",
    "VerifyReport",
    "__version__",
    "capture_config",
    "convert",
    "diff",
    "export",
    "freeze",
    "inspect",
    "load",
    "load_exported",
    "load_into",
    "load_model",
    "save",
    "save_model",
    "scan",
    "trainable_param_groups",
    "unfreeze",
    "verify",
]


def test_all_is_pinned_and_sorted() -> None:
    assert sorted(torchkeep.__all__) == EXPECTED_ALL
    assert list(torchkeep.__all__) == sorted(torchkeep.__all__)
    assert len(set(torchkeep.__all__)) == len(torchkeep.__all__)


@pytest.mark.parametrize("name", EXPECTED_ALL)
def test_every_public_name_is_importable(name: str) -> None:
    module = importlib.import_module("torchkeep")
    assert getattr(module, name) is not None
    namespace: dict[str, object] = {}
    exec(f"from torchkeep import {name}", namespace)
    assert namespace[name] is getattr(torchkeep, name)


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from torchkeep import *", namespace)
    assert {k for k in namespace if k != "__builtins__"} == set(EXPECTED_ALL)


def test_version_is_the_installed_distribution() -> None:
    assert torchkeep.__version__ == version("torchkeep")


def _params(fn: object) -> list[tuple[str, inspect._ParameterKind, object]]:
    sig = inspect.signature(fn)  # type: ignore[arg-type]
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


P, K = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY
EMPTY = inspect.Parameter.empty


def test_signatures_match_the_spec() -> None:
    assert _params(torchkeep.save) == [
        ("obj", P, EMPTY),
        ("path", P, EMPTY),
        ("metadata", K, None),
        ("storage_options", K, None),
    ]
    assert _params(torchkeep.load) == [
        ("path", P, EMPTY),
        ("map_location", K, None),
        ("dtype", K, None),
        ("trust", K, False),
        ("verify", K, True),
        ("storage_options", K, None),
    ]
    assert _params(torchkeep.load_into) == [
        ("module", P, EMPTY),
        ("source", P, EMPTY),
        ("strict", K, True),
        ("skip_mismatched", K, False),
        ("rename", K, None),
        ("verify", K, True),
        ("storage_options", K, None),
    ]
    assert _params(torchkeep.save_model) == [
        ("model", P, EMPTY),
        ("path", P, EMPTY),
        ("config", K, None),
        ("storage_options", K, None),
    ]
    assert _params(torchkeep.load_model)[:2] == [("path", P, EMPTY), ("map_location", P, None)]
    assert ("trust", K, False) in _params(torchkeep.load_model)
    assert ("key", K, None) in _params(torchkeep.load_model)
    assert [p[0] for p in _params(torchkeep.inspect)] == ["path", "storage_options"]
    # Every entry that takes a path takes an fsspec URL, and its storage options.
    for fn in (
        torchkeep.load_model,
        torchkeep.verify,
        torchkeep.diff,
        torchkeep.convert,
        torchkeep.scan,
        torchkeep.export,
        torchkeep.CheckpointManager,
    ):
        assert ("storage_options", K, None) in _params(fn), fn
    export = _params(torchkeep.export)
    assert export[:3] == [
        ("model_or_ref", P, EMPTY),
        ("example_inputs", P, EMPTY),
        ("path", P, EMPTY),
    ]
    assert ("format", K, None) in export and ("dynamic_batch", K, True) in export
    assert _params(torchkeep.load_exported) == [("path", P, EMPTY), ("trust", K, False)]


def test_load_report_fields() -> None:
    report = torchkeep.LoadReport()
    assert report.loaded == report.missing == report.unexpected == report.mismatched == ()
    assert report.ok
    fields = [f for f in report.__dataclass_fields__]
    assert fields[:4] == ["loaded", "missing", "unexpected", "mismatched"]
    m = torchkeep.Mismatch(key="fc.weight", expected=(2, 3), found=(4, 3))
    bad = torchkeep.LoadReport(loaded=("a",), mismatched=(m,))
    assert not bad.ok
    assert bad.to_dict()["mismatched"] == [
        {"key": "fc.weight", "expected": [2, 3], "found": [4, 3]}
    ]


@pytest.mark.parametrize(
    ("error", "builtin"),
    [
        (torchkeep.CheckpointNotFoundError, FileNotFoundError),
        (torchkeep.CheckpointPrunedError, torchkeep.CheckpointNotFoundError),
        (torchkeep.CorruptCheckpointError, ValueError),
        (torchkeep.FormatVersionError, torchkeep.CorruptCheckpointError),
        (torchkeep.IncompatibleStateError, ValueError),
        (torchkeep.InvalidArgumentError, ValueError),
        (torchkeep.RunLockedError, torchkeep.TorchkeepError),
        (torchkeep.SnapshotChangedError, torchkeep.TorchkeepError),
        (torchkeep.UnsupportedValueError, TypeError),
        (torchkeep.ModelClassError, ImportError),
        (torchkeep.StorageError, OSError),
        (torchkeep.UnsafeCheckpointError, torchkeep.TorchkeepError),
        (torchkeep.ExportError, torchkeep.TorchkeepError),
        (torchkeep.ExportVerificationError, torchkeep.ExportError),
        (torchkeep.ExportVerificationError, ValueError),
    ],
)
def test_error_hierarchy(error: type[Exception], builtin: type[Exception]) -> None:
    assert issubclass(error, torchkeep.TorchkeepError)
    assert issubclass(error, builtin)
    assert issubclass(torchkeep.TorchkeepError, Exception)


def test_error_message_names_path_and_hint() -> None:
    err = torchkeep.CorruptCheckpointError(
        "bad \x1b[31mred\x1b[0m bytes", path="/x/y.pt", key="w", hint="restore it"
    )
    text = str(err)
    assert "/x/y.pt" in text and "bad red bytes" in text and "hint: restore it" in text
    assert "\x1b" not in text
    assert (err.path, err.key, err.hint) == ("/x/y.pt", "w", "restore it")
    unsafe = torchkeep.UnsafeCheckpointError("no", globals=["posix.system"])
    assert unsafe.globals == ["posix.system"]
    incompatible = torchkeep.IncompatibleStateError("no", report=torchkeep.LoadReport())
    assert incompatible.report == torchkeep.LoadReport()


def test_run_locked_error_lives_in_errors() -> None:
    from torchkeep.errors import RunLockedError
    from torchkeep.manager import RunLockedError as from_manager

    assert torchkeep.RunLockedError is RunLockedError is from_manager
    assert RunLockedError.__module__ == "torchkeep.errors"


@pytest.mark.parametrize("name", ["export", "diff", "verify", "scan", "inspect", "convert"])
def test_verbs_are_functions_and_no_module_hides_behind_them(name: str) -> None:
    """``torchkeep.export`` is the function; the modules that implement verbs are private."""
    assert inspect.isfunction(getattr(torchkeep, name))
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(f"torchkeep.{name}")
