"""The safetensors layer: a strict header parser against hostile files, and the writer."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchkeep
from torchkeep import CorruptCheckpointError
from torchkeep.format._safetensors import ALIGN, HEADER_LIMIT, read_into

from ..models import read_st_header, rewrite_document, write_st

F32 = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def assert_corrupt(path: Path) -> CorruptCheckpointError:
    for read in (torchkeep.load, torchkeep.inspect):
        with pytest.raises(CorruptCheckpointError) as info:
            read(path)
        assert str(path) in str(info.value)
        assert info.value.hint
    return info.value


def test_a_valid_handmade_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "ok.safetensors"
    write_st(path, {"w": entry("F32", [2, 2], 0, 16)}, F32)
    assert torch.equal(torchkeep.load(path)["w"], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))


def test_unpadded_and_misaligned_files_load(tmp_path: Path) -> None:
    path = tmp_path / "odd.safetensors"
    header = {"a": entry("U8", [3], 0, 3), "w": entry("F32", [4], 3, 19)}
    write_st(path, header, b"xyz" + F32, pad=False)
    out = torchkeep.load(path)
    assert out["a"].tolist() == list(b"xyz")
    assert out["w"].tolist() == [1.0, 2.0, 3.0, 4.0]


def test_header_length_larger_than_the_file(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    blob = json.dumps({"w": entry("F32", [4], 0, 16)}).encode()
    path.write_bytes(struct.pack("<Q", len(blob) + 1000) + blob + F32)
    assert_corrupt(path)


def test_header_declared_beyond_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", HEADER_LIMIT + 1) + b"{")
        f.truncate(HEADER_LIMIT + 64)  # sparse: the declared header does fit in the file
    assert_corrupt(path)


def test_huge_header_length_does_not_allocate(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    assert_corrupt(path)


@pytest.mark.parametrize(
    "blob",
    [
        b"{not json",
        b'{"w": }',
        b"\xff\xfe{}",
        b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}',
        b'{"a": NaN}',
        b"[" * 100_000 + b"]" * 100_000,
    ],
    ids=["garbage", "missing-value", "bad-utf8", "unclosed", "nan", "deep"],
)
def test_invalid_json(tmp_path: Path, blob: bytes) -> None:
    path = tmp_path / "x.safetensors"
    write_st(path, blob, F32)
    assert_corrupt(path)


@pytest.mark.parametrize("doc", [[], "str", 3, None, True, [{"w": 1}]], ids=str)
def test_non_object_json(tmp_path: Path, doc: Any) -> None:
    path = tmp_path / "x.safetensors"
    write_st(path, json.dumps(doc).encode(), b"")
    assert_corrupt(path)


def test_duplicate_keys(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    one = json.dumps(entry("F32", [2], 0, 8))
    two = json.dumps(entry("F32", [2], 8, 16))
    write_st(path, f'{{"w": {one}, "w": {two}}}'.encode(), F32)
    err = assert_corrupt(path)
    assert "duplicate" in str(err)


def test_duplicate_keys_in_metadata(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    w = json.dumps(entry("F32", [4], 0, 16))
    blob = f'{{"__metadata__": {{"a": "1", "a": "2"}}, "w": {w}}}'.encode()
    write_st(path, blob, F32)
    assert_corrupt(path)


@pytest.mark.parametrize(
    "header",
    [
        {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)},  # overlap
        {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 0, 8)},  # same bytes
        {"a": entry("F32", [2], 0, 8), "b": entry("F32", [1], 12, 16)},  # hole
        {"a": entry("F32", [4], 8, 24)},  # out of bounds
        {"a": entry("F32", [8], 0, 32)},  # beyond the file
        {"a": entry("F32", [0], 20, 20), "b": entry("F32", [4], 0, 16)},  # empty tensor oob
        {"a": entry("F32", [2], 8, 0)},  # reversed
        {"a": entry("F32", [4], 0, 16), "b": entry("U8", [0], 2**64, 2**64)},  # overflow
    ],
    ids=["overlap", "alias", "gap", "oob", "past-eof", "empty-oob", "reversed", "u64-overflow"],
)
def test_bad_offsets(tmp_path: Path, header: dict[str, Any]) -> None:
    path = tmp_path / "x.safetensors"
    write_st(path, header, F32)
    assert_corrupt(path)


@pytest.mark.parametrize(
    "info",
    [
        entry("F32", [3], 0, 16),  # 12 bytes of shape for 16 of data
        entry("F64", [4], 0, 16),
        entry("F32", [2, 3], 0, 16),
        entry("I8", [15], 0, 16),
        entry("F32", [2**40, 2**40], 0, 16),  # huge shapes must not be trusted
        entry("F32", [2**62, 4, 0], 0, 16),
        entry("F32", [-4], 0, 16),
        entry("F32", [4.0], 0, 16),
        entry("F32", [True, 4], 0, 16),
        entry("F32", "4", 0, 16),
        entry("F32", [None], 0, 16),
        entry("F128", [4], 0, 16),
        entry("f32", [4], 0, 16),
        entry(None, [4], 0, 16),  # type: ignore[arg-type]
        {"dtype": "F32", "shape": [4], "data_offsets": [0, 16, 32]},
        {"dtype": "F32", "shape": [4], "data_offsets": [-16, 0]},
        {"dtype": "F32", "shape": [4], "data_offsets": [0.0, 16.0]},
        {"dtype": "F32", "shape": [4], "data_offsets": "0-16"},
        {"dtype": "F32", "shape": [4]},
        {"dtype": "F32", "shape": [4], "data_offsets": [0, 16], "extra": 1},
        "F32",
        [4],
        None,
    ],
    ids=lambda x: json.dumps(x),
)
def test_entries_disagreeing_with_their_bytes(tmp_path: Path, info: Any) -> None:
    path = tmp_path / "x.safetensors"
    write_st(path, {"w": info}, F32)
    assert_corrupt(path)


def test_trailing_bytes(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    write_st(path, {"w": entry("F32", [4], 0, 16)}, F32 + b"\x00" * 8)
    assert_corrupt(path)


@pytest.mark.parametrize(
    "metadata",
    [["a"], {"a": 1}, {"a": None}, {"a": {"b": "c"}}, "x"],
    ids=json.dumps,
)
def test_metadata_must_map_strings_to_strings(tmp_path: Path, metadata: Any) -> None:
    path = tmp_path / "x.safetensors"
    write_st(path, {"__metadata__": metadata, "w": entry("F32", [4], 0, 16)}, F32)
    assert_corrupt(path)


def test_too_small_files(tmp_path: Path) -> None:
    for i, data in enumerate([b"\x02", b"\x02\x00\x00\x00\x00\x00\x00", b"\x00" * 8]):
        path = tmp_path / f"x{i}.safetensors"
        path.write_bytes(data)
        assert_corrupt(path)


def test_empty_header_object_is_an_empty_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    write_st(path, {}, b"")
    assert torchkeep.load(path) == {}


# --- the torchkeep document inside the header -------------------------------------------------


def _tk_file(tmp_path: Path) -> Path:
    path = tmp_path / "tk.safetensors"
    w = torch.randn(4, 4)
    torchkeep.save({"w": w, "wt": w.t(), "f8": torch.ones(3).to(torch.float8_e8m0fnu)}, path)
    return path


def test_torchkeep_document_that_is_not_json(tmp_path: Path) -> None:
    path = _tk_file(tmp_path)
    header, data = read_st_header(path)
    header["__metadata__"]["torchkeep"] = "{broken"
    write_st(path, header, data)
    assert_corrupt(path)


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.pop("skeleton"),
        lambda d: d.update(skeleton={"$": "dict", "v": {"w": {"$": "tensor", "k": "nope"}}}),
        lambda d: d.update(skeleton={"$": "dict", "v": {"w": {"$": "tensor"}}}),
        lambda d: d.update(skeleton={"$": "dict", "v": {"w": {"$": "tensor", "k": ["w"]}}}),
        lambda d: d.update(skeleton={"$": "dict", "v": {"w": {"$": "tensor", "k": None}}}),
        lambda d: d.update(skeleton={"$": "quantum"}),
        lambda d: d.update(raw=[]),
        lambda d: d.update(metadata="x"),
        lambda d: d["raw"]["f8"].update(dtype="float8_e99"),
        lambda d: d["raw"]["f8"].update(shape=[1000]),
        lambda d: d["raw"]["f8"].update(shape="12"),
        lambda d: d["raw"]["f8"].pop("dtype"),
        lambda d: d["raw"]["f8"].update(dtype=7),
        lambda d: d["skeleton"]["v"]["wt"]["view"].update(offset=-4),
        lambda d: d["skeleton"]["v"]["wt"]["view"].update(offset=2),
        lambda d: d["skeleton"]["v"]["wt"]["view"].update(stride=[1000, 1000]),
        lambda d: d["skeleton"]["v"]["wt"]["view"].update(shape=[400, 4]),
        lambda d: d["skeleton"]["v"]["wt"]["view"].update(stride=[-1, 4]),
        lambda d: d["skeleton"]["v"]["wt"]["view"].update(shape=[4]),
        lambda d: d["skeleton"]["v"]["wt"]["view"].update(dtype="complex1024"),
        lambda d: d["skeleton"]["v"]["wt"]["view"].update(dtype=4),
        lambda d: d["skeleton"]["v"]["wt"].update(view="everything"),
        lambda d: d["skeleton"]["v"]["wt"]["view"].pop("stride"),
    ],
    ids=[
        "no-skeleton",
        "unknown-key",
        "no-key",
        "list-key",
        "null-key",
        "unknown-tag",
        "raw-list",
        "metadata-str",
        "raw-dtype",
        "raw-shape",
        "raw-shape-str",
        "raw-no-dtype",
        "raw-dtype-int",
        "view-negative",
        "view-misaligned",
        "view-stride-oob",
        "view-shape-oob",
        "view-negative-stride",
        "view-rank",
        "view-dtype",
        "view-dtype-int",
        "view-str",
        "view-no-stride",
    ],
)
def test_hostile_torchkeep_documents(tmp_path: Path, edit: Any) -> None:
    path = _tk_file(tmp_path)
    assert torchkeep.load(path)["w"].shape == (4, 4)
    rewrite_document(path, edit)
    with pytest.raises(CorruptCheckpointError) as info:
        torchkeep.load(path)
    assert str(path) in str(info.value)


@given(
    doc=st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text()),
        lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=5), c)),
        max_leaves=10,
    ),
    slot=st.sampled_from(["header", "w", "dtype", "shape", "offsets", "skeleton", "view", "raw"]),
)
@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_random_json_anywhere_in_the_header_is_handled(tmp_path: Path, doc: Any, slot: str) -> None:
    path = tmp_path / "fuzz.safetensors"
    w = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    torchkeep.save({"w": w, "wt": w.t(), "h": torch.ones(2).to(torch.float8_e8m0fnu)}, path)
    header, data = read_st_header(path)
    tk = json.loads(header["__metadata__"]["torchkeep"])
    if slot == "header":
        header = doc
    elif slot == "w":
        header["w"] = doc
    elif slot in ("dtype", "shape"):
        header["w"][slot] = doc
    elif slot == "offsets":
        header["w"]["data_offsets"] = doc
    elif slot == "skeleton":
        tk["skeleton"]["v"]["wt"] = doc
    elif slot == "view":
        tk["skeleton"]["v"]["wt"]["view"] = doc
    else:
        tk["raw"]["h"] = doc
    if isinstance(header, dict) and isinstance(header.get("__metadata__"), dict):
        header["__metadata__"]["torchkeep"] = json.dumps(tk)
    write_st(path, header, data)
    try:
        out = torchkeep.load(path)
    except CorruptCheckpointError as exc:
        assert str(path) in str(exc)
        return
    # an edit the reader accepts must not change the tensors: they come back exactly; only a
    # rewritten skeleton entry (a valid plain value in place of the view) may change ``wt``
    assert set(out) == {"w", "wt", "h"}
    assert out["w"].dtype == torch.float32 and torch.equal(out["w"], w)
    if slot != "skeleton" or isinstance(out["wt"], torch.Tensor):
        assert torch.equal(out["wt"], w.t()) and out["wt"].stride() == (1, 4)
    assert out["h"].dtype == torch.float8_e8m0fnu
    assert torch.equal(out["h"].view(torch.uint8), torch.full((2,), 127, dtype=torch.uint8))


# --- the writer -------------------------------------------------------------------------------


def test_written_files_are_aligned(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    tensors = {
        "u8": torch.arange(3, dtype=torch.uint8),
        "f64": torch.randn(3, dtype=torch.float64),
        "f16": torch.randn(5).half(),
        "c128": torch.randn(2, dtype=torch.complex128),
        "i32": torch.arange(7, dtype=torch.int32),
    }
    torchkeep.save(tensors, path)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % ALIGN == 0
    header = json.loads(raw[8 : 8 + n])
    for key, t in tensors.items():
        begin = header[key]["data_offsets"][0]
        assert begin % t.element_size() == 0, key
    assert raw[8 : 8 + n].rstrip(b" ").endswith(b"}")


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(2)[::2],  # shape (1,), stride (2,): is_contiguous() is True
        lambda: torch.randn(1, 3, dtype=torch.float64)[:, 1::2],
        lambda: torch.randn(4, 1, 3)[:, :, 2:],
        lambda: torch.randn(3, 3).t()[:1, :1],
    ],
    ids=["1d", "2d", "3d", "transposed"],
)
def test_writer_handles_odd_strides_of_size_one_dims(tmp_path: Path, make: Any) -> None:
    t = make()
    path = tmp_path / "x.safetensors"
    torchkeep.save({"t": t}, path)
    assert torch.equal(torchkeep.load(path)["t"], t)
    assert torch.equal(safetensors.torch.load_file(str(path))["t"], t)


def test_written_files_load_with_safetensors_and_metadata(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    torchkeep.save({"a": torch.ones(2), "b": {"c": torch.zeros(3, 3)}}, path, metadata={"k": 1})
    with safetensors.safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == ["a", "b.c"]
        assert f.metadata()["format"] == "pt"
        assert json.loads(f.metadata()["torchkeep"])["metadata"] == {"k": 1}


def test_read_into_a_truncated_file_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    path.write_bytes(b"\x00" * 10)
    out = torch.empty(4)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(CorruptCheckpointError):
            read_into(fd, 0, 16, out, path=str(path))
        read_into(fd, 2, 8, out[:2], path=str(path))
    finally:
        os.close(fd)
    assert torch.equal(out[:2], torch.zeros(2))


def test_file_shrunk_after_mapping_is_not_a_crash(tmp_path: Path) -> None:
    """load_into reads straight from the file: a file cut meanwhile must not crash the process."""
    path = tmp_path / "x.safetensors"
    model = torch.nn.Linear(64, 64)
    torchkeep.save(model.state_dict(), path)
    from torchkeep.format import SafetensorsFile

    reader = SafetensorsFile(str(path))
    obj = reader.load()
    with open(path, "r+b") as f:
        f.truncate(200)
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = reader.mapped.offset_of(obj["weight"])
        assert offset is not None
        with pytest.raises(CorruptCheckpointError):
            read_into(fd, offset, 64 * 64 * 4, torch.empty(64, 64), path=str(path))
    finally:
        os.close(fd)
