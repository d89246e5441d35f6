"""Crafted values behind valid seals: every decoder refuses them with a torchkeep error.

Each file here is sealed as torchkeep's writer seals it (``rewrite_document``/``rewrite_manifest``
recompute the digests), so that the crafted value reaches the check behind the seal. A decoder
may only raise :class:`~torchkeep.TorchkeepError` subclasses: never crash the interpreter, never
let ``OverflowError``, ``ValueError`` or ``NotImplementedError`` escape raw.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

import torchkeep as tk
from torchkeep.format._dtypes import VIEWABLE_DTYPES, tensor_dtype_from_name
from torchkeep.format._run import RunReader
from torchkeep.manager._retention import rank_by_metric

from ..models import rewrite_document, rewrite_manifest

ROOT = Path(__file__).resolve().parents[2]
ALL_DTYPES = sorted(
    {v for n in dir(torch) if isinstance(v := getattr(torch, n), torch.dtype)}, key=str
)
NOT_VIEWABLE = [d for d in ALL_DTYPES if d not in VIEWABLE_DTYPES]


def _raw_file(path: Path, dtype_name: str, nbytes: int = 64) -> Path:
    """A sealed torchkeep file whose one raw (U8) tensor declares ``dtype_name``."""
    tk.save({"w": torch.zeros(nbytes // 16, dtype=torch.complex128)}, path)

    def edit(doc: dict[str, Any]) -> None:
        (key,) = doc["raw"]
        doc["raw"][key] = {"dtype": dtype_name, "shape": [nbytes]}

    rewrite_document(path, edit)
    return path


def test_quantized_dtypes_are_not_viewable() -> None:
    assert {torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4} <= set(
        NOT_VIEWABLE
    )


def test_a_raw_tensor_of_a_quantized_dtype_is_refused_not_a_segfault(tmp_path: Path) -> None:
    # In a child process: before the fix, each of these killed the interpreter with SIGSEGV.
    for dtype in NOT_VIEWABLE:
        _raw_file(tmp_path / f"{dtype_name(dtype)}.safetensors", dtype_name(dtype))
    script = textwrap.dedent(
        """
        import sys, torch, torchkeep as tk
        from typer.testing import CliRunner
        from torchkeep.cli import app
        for path in sys.argv[1:]:
            for name, call in [
                ("load", lambda: tk.load(path)),
                ("load-unverified", lambda: tk.load(path, verify=False)),
                ("inspect", lambda: tk.inspect(path)),
                ("load_into", lambda: tk.load_into(torch.nn.Linear(2, 2), path, strict=False)),
            ]:
                try:
                    call()
                    print(path, name, "LOADED")
                except tk.CorruptCheckpointError:
                    print(path, name, "refused")
            print(path, "verify", "ok" if tk.verify(path).ok else "refused")
            for command in ("verify", "inspect"):
                code = CliRunner().invoke(app, [command, path]).exit_code
                print(path, "cli-" + command, "refused" if code else "exit 0")
        """
    )
    files = sorted(str(p) for p in tmp_path.iterdir())
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, "-c", script, *files],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"the child died ({done.returncode}): {done.stderr[-2000:]}"
    lines = done.stdout.splitlines()
    assert len(lines) == 7 * len(files)
    assert all(line.endswith(" refused") for line in lines), lines


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_dtype_is_either_built_from_bytes_or_refused(dtype: torch.dtype) -> None:
    name = dtype_name(dtype)
    if dtype in VIEWABLE_DTYPES:
        assert tensor_dtype_from_name(name) is dtype
        torch.frombuffer(bytearray(64), dtype=dtype, count=64 // dtype.itemsize).reshape(-1)
    else:
        with pytest.raises(tk.CorruptCheckpointError, match="cannot be built from raw bytes"):
            tensor_dtype_from_name(name, path="x", key="w")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("dtype", NOT_VIEWABLE, ids=str)
def test_views_and_manifests_refuse_dtypes_not_viewable(tmp_path: Path, dtype: torch.dtype) -> None:
    # The other two places a tensor's dtype comes from a file: a view, a manifest entry.
    base = torch.arange(16, dtype=torch.float32)
    path = tmp_path / "v.safetensors"
    tk.save({"a": base, "b": base[4:12]}, path)

    def edit(doc: dict[str, Any]) -> None:
        doc["skeleton"]["v"]["b"]["view"]["dtype"] = dtype_name(dtype)

    rewrite_document(path, edit)
    with pytest.raises(tk.CorruptCheckpointError):
        tk.load(path)
    run = tmp_path / "run"
    with tk.CheckpointManager(run) as mgr:
        mgr.save(1, {"w": torch.ones(4)})
    manifest = run / "checkpoints" / "0000000001.json"
    rewrite_manifest(manifest, lambda doc: doc["tensors"]["w"].update(dtype=dtype_name(dtype)))
    with pytest.raises(tk.CorruptCheckpointError, match="cannot be built from raw bytes"):
        tk.load(f"{run}@1")


SHELL = [d for d in VIEWABLE_DTYPES if d.itemsize == 1 and str(d)[6:].lstrip("u")[:3] == "int"]
SHELL = [d for d in SHELL if str(d) not in ("torch.int8", "torch.uint8")]


@pytest.mark.parametrize("dtype", SHELL, ids=str)
def test_views_of_dtypes_without_copy_kernel_verify(tmp_path: Path, dtype: torch.dtype) -> None:
    # found by the sealed-header fuzzer: verify hashes every tensor, copying a non-contiguous
    # view to do so, and torch has no copy kernel for int1..int7/uint1..uint7, so
    # NotImplementedError escaped; a file torchkeep writes itself had the same problem
    t = torch.arange(16, dtype=torch.uint8).view(dtype)
    path = tmp_path / "own.safetensors"
    tk.save({"t": t, "v": t[4:8], "w": t.view(4, 4).t()}, path)
    out = tk.load(path)
    assert torch.equal(out["w"].view(torch.uint8), t.view(4, 4).t().view(torch.uint8))
    assert tk.verify(path).ok
    base = torch.arange(16, dtype=torch.float32)
    crafted = tmp_path / "crafted.safetensors"
    tk.save({"a": base, "t": base.view(4, 4).t()}, crafted)
    rewrite_document(
        crafted, lambda d: d["skeleton"]["v"]["t"]["view"].update(dtype=dtype_name(dtype))
    )
    assert outcome_of(lambda: tk.load(crafted)) in ("ok", "refused")
    assert tk.verify(crafted) is not None


def outcome_of(call: Any) -> str:
    try:
        call()
    except tk.TorchkeepError:
        return "refused"
    return "ok"


def test_load_into_a_tensor_without_copy_kernel_is_incompatible(tmp_path: Path) -> None:
    # a file may hold uint4 tensors (torchkeep saves them); copying one into a float parameter
    # raised NotImplementedError from torch
    path = tmp_path / "u4.safetensors"
    tk.save({"weight": torch.zeros(64, dtype=torch.uint4), "bias": torch.zeros(8)}, path)
    rewrite_document(path, lambda d: d["raw"]["weight"].update(shape=[8, 8]))
    with pytest.raises(tk.IncompatibleStateError, match="'weight'") as err:
        tk.load_into(torch.nn.Linear(8, 8), path)
    assert err.value.key == "weight"


# --- numbers beyond range -------------------------------------------------------------------

BIG = 10**400  # a valid JSON integer that no float holds

SKELETON_VALUES = {
    "float-tag": {"$": "float", "v": BIG},
    "complex": {"$": "complex", "v": [BIG, 0]},
    "np-float32": {"$": "np", "dtype": "<f4", "v": BIG},
    "np-int8": {"$": "np", "dtype": "|i1", "v": 1000},
    "np-float16-cast": {"$": "np", "dtype": "<f2", "v": 1e10},
    "np-complex64-cast": {"$": "np", "dtype": "<c8", "v": {"$": "complex", "v": [1e300, 0]}},
    "np-object": {"$": "np", "dtype": "|O", "v": 1},
    "np-bogus": {"$": "np", "dtype": "nope", "v": 1},
    "size": {"$": "size", "v": [BIG]},
    "plain-1e999": 0.0,  # replaced by the literal 1e999 (parses as inf) below
}


@pytest.mark.parametrize("name", list(SKELETON_VALUES))
def test_out_of_range_numbers_in_a_sealed_skeleton_are_corrupt(tmp_path: Path, name: str) -> None:
    path = tmp_path / "x.safetensors"
    tk.save({"w": torch.ones(2), "x": 1}, path)
    rewrite_document(path, lambda doc: doc["skeleton"]["v"].update(x=SKELETON_VALUES[name]))
    if name == "plain-1e999":
        _replace_in_document(path, b'"x":0.0', b'"x":1e999')
    with pytest.raises(tk.CorruptCheckpointError):
        tk.load(path)
    with pytest.raises(tk.CorruptCheckpointError):
        tk.inspect(path)


def _replace_in_document(path: Path, old: bytes, new: bytes) -> None:
    """Edit the document's JSON text (for values json.dumps cannot write), sealed again."""
    from ..models import read_st_header, write_st

    header, data = read_st_header(path)
    text = header["__metadata__"]["torchkeep"].encode()
    assert old in text.replace(b" ", b"")
    header["__metadata__"]["torchkeep"] = text.replace(b" ", b"").replace(old, new).decode()
    write_st(path, header, data)


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.update(time=BIG),
        lambda d: d["tensors"]["w"].update(nbytes="1" * 5000),
        lambda d: d["tensors"]["w"].update(nbytes=16.0),
        lambda d: d["tensors"]["w"].update(shape=[BIG]),
        lambda d: d["tensors"]["w"].update(shape=[2**62] * 3),
        lambda d: d.update(format_version="².0"),
        lambda d: d.update(format_version="1" * 5000 + ".0"),
        lambda d: d.update(format_version="١.0"),
    ],
    ids=["time", "nbytes-digits", "nbytes-float", "shape-big", "shape-product", "version-sup2"]
    + ["version-5000", "version-arabic"],
)
def test_crafted_numbers_in_a_sealed_manifest_are_corrupt(tmp_path: Path, edit: Any) -> None:
    run = tmp_path / "run"
    with tk.CheckpointManager(run) as mgr:
        mgr.save(1, {"w": torch.ones(4)})
    rewrite_manifest(run / "checkpoints" / "0000000001.json", edit)
    with pytest.raises(tk.CorruptCheckpointError):
        tk.load(f"{run}@1")


@pytest.mark.parametrize("version", ["²", "1" * 5000, "١", "1.x", " 1", "1\n"])
def test_crafted_version_strings_are_corrupt(tmp_path: Path, version: str) -> None:
    path = tmp_path / "x.safetensors"
    tk.save({"w": torch.ones(2)}, path)
    rewrite_document(path, lambda doc: doc.update(format_version=version))
    with pytest.raises(tk.CorruptCheckpointError):
        tk.load(path)


def test_a_metric_beyond_float_range_never_wins_best(tmp_path: Path) -> None:
    assert rank_by_metric([(1, {"loss": BIG}), (2, {"loss": 1.0})], "loss", "min") == [2]


def test_manifest_files_named_with_endless_digits_are_not_steps(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with tk.CheckpointManager(run) as mgr:
        mgr.save(1, {"w": torch.ones(4)})
    (run / "checkpoints" / ("9" * 250 + ".json")).write_text("{}")
    (run / "checkpoints" / ("٤" * 10 + ".json")).write_text("{}")
    assert RunReader(run).steps() == [1]
    assert torch.equal(tk.load(f"{run}@latest")["w"], torch.ones(4))


def test_json_1e999_is_refused_not_infinity(tmp_path: Path) -> None:
    from torchkeep.format._json import parse_json

    with pytest.raises(tk.CorruptCheckpointError, match="out of range"):
        parse_json(b'{"x": 1e999}', what="manifest", path="m.json")
    assert json.loads(b'{"x": 1e999}')["x"] == float("inf")  # what json alone does


@pytest.mark.parametrize("name", ["model.bin", "model.safetensors.index.json", "x.pt"])
def test_deeply_nested_json_files_are_corrupt_not_recursion_errors(
    tmp_path: Path, name: str
) -> None:
    path = tmp_path / name
    path.write_bytes(b'{"a": ' + b"[" * 100_000)  # detection parsed it with plain json.loads
    with pytest.raises(tk.CorruptCheckpointError):
        tk.load(path)
    with pytest.raises(tk.CorruptCheckpointError):
        tk.inspect(path)


def test_a_deep_line_in_the_metrics_history_is_skipped(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with tk.CheckpointManager(run) as mgr:
        mgr.save(1, {"w": torch.ones(1)}, metrics={"loss": 1.0})
    with open(run / "metrics.jsonl", "a") as f:
        f.write("[" * 100_000 + "\n")
    with tk.CheckpointManager(run) as mgr:
        assert [r["step"] for r in mgr.history] == [1]


# --- bounds of every JSON document and shape ---------------------------------------------


def test_json_documents_are_bounded_in_size_containers_and_depth(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from torchkeep.format import _json
    from torchkeep.format._json import JSON_MAX_DEPTH, parse_json

    with pytest.raises(tk.CorruptCheckpointError, match="over the 10-byte limit"):
        parse_json(b'{"a": [1, 2, 3]}', what="manifest", path="m.json", max_bytes=10)
    monkeypatch.setattr(_json, "JSON_MAX_CONTAINERS", 100)
    with pytest.raises(tk.CorruptCheckpointError, match="objects and arrays"):
        parse_json(b"[" + b"[]," * 200 + b"[]]", what="manifest", path="m.json")
    monkeypatch.undo()
    deep = b"[" * (JSON_MAX_DEPTH + 5) + b"]" * (JSON_MAX_DEPTH + 5)  # json itself parses it
    with pytest.raises(tk.CorruptCheckpointError, match="nested deeper"):
        parse_json(deep, what="manifest", path="m.json")
    ok = b"[" * JSON_MAX_DEPTH + b"]" * JSON_MAX_DEPTH
    assert parse_json(ok, what="manifest", path="m.json") is not None


def test_an_oversized_manifest_is_refused_before_it_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchkeep.format._run import _manifest as _run

    run = tmp_path / "run"
    with tk.CheckpointManager(run) as mgr:
        mgr.save(1, {"w": torch.ones(4)})
    monkeypatch.setattr(_run, "JSON_LIMIT", 100)
    with pytest.raises(tk.CorruptCheckpointError, match="over the 100-byte limit"):
        tk.load(f"{run}@1")


@pytest.mark.parametrize(
    "shape",
    [[2**62] * 200_000, [1] * 2000, [-1, 4], [True, 4], [2**63], [0, 2**62, 2**62], [2.0]],
    ids=["200k-huge-dims", "2000-dims", "negative", "bool", "int64-overflow", "zero-product"]
    + ["float"],
)
def test_crafted_shapes_are_refused_quickly(tmp_path: Path, shape: list[Any]) -> None:
    import time

    path = tmp_path / "x.safetensors"
    tk.save({"w": torch.zeros(4, dtype=torch.complex128)}, path)
    rewrite_document(path, lambda doc: doc["raw"]["w"].update(shape=shape))
    start = time.monotonic()
    with pytest.raises(tk.CorruptCheckpointError, match="invalid shape"):
        tk.load(path)
    assert time.monotonic() - start < 5.0
