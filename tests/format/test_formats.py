"""Foreign formats: detection from bytes, Hugging Face sharded checkpoints, torch.save files."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import torchkeep
from torchkeep import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
)
from torchkeep.format import Format, _torchfile, detect

from ..models import MLP, BNNet, Opaque, TiedLM, assert_same, fill_


def _tutorial(seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return {
        "epoch": 7,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": opt.state_dict(),
        "loss": torch.tensor(0.5),
    }


# --- detection --------------------------------------------------------------------------------


def test_detect_each_format_from_its_bytes(tmp_path: Path) -> None:
    obj = {"w": torch.ones(2)}
    files = {}
    torchkeep.save(obj, tmp_path / "a.bin")
    files["a.bin"] = Format.TORCH_ZIP
    torchkeep.save(obj, tmp_path / "b.data")  # not a torch suffix: safetensors
    files["b.data"] = Format.SAFETENSORS
    safetensors.torch.save_file(obj, str(tmp_path / "c.pt"))
    files["c.pt"] = Format.SAFETENSORS
    torch.save(obj, tmp_path / "d.safetensors", _use_new_zipfile_serialization=False)
    files["d.safetensors"] = Format.TORCH_LEGACY
    torch.save(obj, tmp_path / "e")
    files["e"] = Format.TORCH_ZIP
    (tmp_path / "f.txt").write_text(json.dumps({"weight_map": {"w": "c.pt"}}))
    files["f.txt"] = Format.HF_SHARDED
    for name, fmt in files.items():
        assert detect(tmp_path / name) is fmt, name
    torchkeep.save_model(MLP(), tmp_path / "model", config={})
    assert detect(tmp_path / "model") is Format.MODEL_DIR


_TENSORS = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([7, 8])}


def _padded_safetensors(n: int, lead: bytes, space: bytes) -> bytes:
    """A valid safetensors file whose header is exactly ``n`` bytes: ``lead``, JSON, ``space``*."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    data = b""
    for key, t in _TENSORS.items():
        raw = t.numpy().tobytes()
        code = "F32" if t.dtype == torch.float32 else "I64"
        header[key] = {
            "dtype": code,
            "shape": list(t.shape),
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    text = lead + json.dumps(header).encode()
    assert len(text) <= n
    text += (space * n)[: n - len(text)]
    return struct.pack("<Q", n) + text + data


# Header lengths whose first byte reads as another format's magic: 0x80 (a pickle's PROTO),
# "P" (a zip's PK), "L" (a protocol-0 pickle's LONG), "{" (JSON), and all the others.
_LENGTHS = st.one_of(
    st.integers(min_value=300, max_value=5000),
    st.builds(
        lambda k, low: 256 * k + low, st.integers(2, 400), st.sampled_from([0x80, 0x50, 0x4C, 0x7B])
    ),
)


@given(
    n=_LENGTHS,
    lead=st.text(alphabet=" \t\n\r", max_size=100).map(str.encode),
    space=st.sampled_from([b" ", b"\t", b"\n", b"\r", b" \n"]),
)
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_detect_safetensors_whatever_its_header_length_and_padding(
    tmp_path: Path, n: int, lead: bytes, space: bytes
) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(_padded_safetensors(n, lead, space))
    assert detect(path) is Format.SAFETENSORS
    loaded = torchkeep.load(path)
    assert loaded.keys() == _TENSORS.keys()
    assert all(torch.equal(loaded[k], v) for k, v in _TENSORS.items())
    assert torchkeep.inspect(path).format == "safetensors"
    if not lead:  # the layout its own writers make: safetensors agrees it is valid
        peer = safetensors.torch.load_file(str(path))
        assert all(torch.equal(peer[k], v) for k, v in _TENSORS.items())


@pytest.mark.slow
def test_detect_safetensors_whose_length_spells_pk(tmp_path: Path) -> None:
    n = 0x04034B50  # 67 MB of header: the file starts with b"PK\x03\x04", a zip's magic
    path = tmp_path / "pk.safetensors"
    path.write_bytes(_padded_safetensors(n, b"", b" "))
    assert path.read_bytes()[:4] == b"PK\x03\x04"
    assert detect(path) is Format.SAFETENSORS
    assert torch.equal(torchkeep.load(path)["a"], _TENSORS["a"])


@given(
    legacy=st.booleans(),
    protocol=st.integers(min_value=0, max_value=5),
    size=st.integers(min_value=0, max_value=300),
)
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_detect_every_torch_save_layout(
    tmp_path: Path, legacy: bool, protocol: int, size: int
) -> None:
    obj = {"w": torch.arange(size, dtype=torch.float32), "step": size}
    path = tmp_path / "x.pt"
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy, pickle_protocol=protocol)
    assert detect(path) is (Format.TORCH_LEGACY if legacy else Format.TORCH_ZIP)
    if protocol >= 1:  # torch.load itself cannot read protocol 0 (persistent ids turn to str)
        loaded = torchkeep.load(path, trust=True)  # our own file; the safe unpickler reads 2, 3
        assert loaded["step"] == size and torch.equal(loaded["w"], obj["w"])
    if protocol in (2, 3):
        assert torch.equal(torchkeep.load(path)["w"], obj["w"])


def test_inspect_reports_the_detected_format(tmp_path: Path) -> None:
    obj = {"w": torch.ones(2)}
    torchkeep.save(obj, tmp_path / "a.safetensors")
    safetensors.torch.save_file(obj, str(tmp_path / "b.safetensors"))
    torch.save(obj, tmp_path / "c.pt")
    torch.save(obj, tmp_path / "d.pt", _use_new_zipfile_serialization=False)
    formats = {
        name: torchkeep.inspect(tmp_path / f"{name}{ext}").format
        for name, ext in (("a", ".safetensors"), ("b", ".safetensors"), ("c", ".pt"), ("d", ".pt"))
    }
    assert formats == {
        "a": "torchkeep",
        "b": "safetensors",
        "c": "torch-zip",
        "d": "torch-legacy",
    }


def test_zip_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(CorruptCheckpointError) as info:
        torchkeep.load(path)
    assert str(path) in str(info.value)


# --- Hugging Face sharded checkpoints ---------------------------------------------------------


def _shard(tmp_path: Path, kind: str) -> tuple[Path, dict[str, torch.Tensor]]:
    sd = fill_(MLP(d_in=4, hidden=8, d_out=3), 1).state_dict()
    parts = [
        {k: v for k, v in sd.items() if k.startswith("fc1")},
        {k: v for k, v in sd.items() if k.startswith("fc2")},
    ]
    weight_map = {}
    if kind == "safetensors":
        index = tmp_path / "model.safetensors.index.json"
        names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        for part, name in zip(parts, names, strict=True):
            safetensors.torch.save_file(part, str(tmp_path / name), metadata={"format": "pt"})
    else:
        index = tmp_path / "pytorch_model.bin.index.json"
        names = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
        for part, name in zip(parts, names, strict=True):
            torch.save(part, tmp_path / name)
    for part, name in zip(parts, names, strict=True):
        weight_map.update(dict.fromkeys(part, name))
    total = sum(v.numel() * v.element_size() for v in sd.values())
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return index, dict(sd)


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_hf_sharded_checkpoint_loads_from_index_or_directory(tmp_path: Path, kind: str) -> None:
    index, sd = _shard(tmp_path, kind)
    for source in (index, tmp_path):
        out = torchkeep.load(source)
        assert set(out) == set(sd)
        for k, v in sd.items():
            assert torch.equal(out[k], v), k
    out16 = torchkeep.load(index, dtype=torch.float16)
    assert all(t.dtype == torch.float16 for t in out16.values())
    model = MLP()
    report = torchkeep.load_into(model, tmp_path)
    assert report.ok and set(report.loaded) == set(sd)
    assert torch.equal(model.fc2.bias, sd["fc2.bias"])
    info = torchkeep.inspect(index)
    assert info.format == "hf-sharded"
    assert info.metadata["total_size"] == sum(v.numel() * 4 for v in sd.values())
    assert {t.name for t in info.tensors} == set(sd)


@pytest.mark.parametrize(
    "shard",
    [
        "../evil.safetensors",
        "sub/../../evil.safetensors",
        "/etc/passwd",
        "..",
        ".",
        "",
        "..\\evil.safetensors",
        "sub/model.safetensors",
    ],
)
def test_hf_index_cannot_point_outside_its_directory(tmp_path: Path, shard: str) -> None:
    inner = tmp_path / "repo"
    inner.mkdir()
    (inner / "sub").mkdir()
    safetensors.torch.save_file({"w": torch.ones(1)}, str(tmp_path / "evil.safetensors"))
    safetensors.torch.save_file({"w": torch.ones(1)}, str(inner / "sub" / "model.safetensors"))
    index = inner / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": shard}}))
    with pytest.raises(CorruptCheckpointError) as info:
        torchkeep.load(index)
    assert str(index) in str(info.value)


def test_hf_shards_may_be_symlinks_as_in_the_hub_cache(tmp_path: Path) -> None:
    inner = tmp_path / "repo"
    inner.mkdir()
    secret = tmp_path / "secret.safetensors"
    safetensors.torch.save_file({"w": torch.full((2,), 42.0)}, str(secret))
    (inner / "model-1.safetensors").symlink_to(secret)
    index = inner / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "model-1.safetensors"}}))
    # the Hugging Face cache links every shard to a blob elsewhere: a plain name is allowed
    assert torch.equal(torchkeep.load(index)["w"], torch.full((2,), 42.0))


def test_hf_missing_shard(tmp_path: Path) -> None:
    index, _ = _shard(tmp_path, "safetensors")
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError) as info:
        torchkeep.load(index)
    assert "model-00002-of-00002.safetensors" in str(info.value)
    assert info.value.hint


def test_hf_index_listing_a_tensor_its_shard_lacks(tmp_path: Path) -> None:
    index, _ = _shard(tmp_path, "safetensors")
    doc = json.loads(index.read_text())
    doc["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(doc))
    with pytest.raises(CorruptCheckpointError, match="ghost.weight"):
        torchkeep.load(index)


@pytest.mark.parametrize(
    "doc",
    [
        {"weight_map": []},
        {"weight_map": {"w": 3}},
        {"weight_map": {"w": ["a", "b"]}},
        {"weight_map": {"w": None}},
    ],
    ids=json.dumps,
)
def test_hf_malformed_index(tmp_path: Path, doc: Any) -> None:
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps(doc))
    with pytest.raises(CorruptCheckpointError) as info:
        torchkeep.load(index)
    assert str(index) in str(info.value)


def test_hf_shard_that_is_not_a_flat_state_dict(tmp_path: Path) -> None:
    torchkeep.save({"w": {"nested": torch.ones(1)}}, tmp_path / "shard.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w.nested": "shard.safetensors"}}))
    with pytest.raises(CorruptCheckpointError):
        torchkeep.load(index)


def test_hf_shard_that_is_an_index_itself_is_refused(tmp_path: Path) -> None:
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "model.safetensors.index.json"}}))
    with pytest.raises(CorruptCheckpointError):
        torchkeep.load(index)


def test_hf_unsafe_bin_shard_is_refused(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    torch.save({"w": torch.ones(1), "x": _Boom(canary)}, tmp_path / "pytorch_model-1.bin")
    index = tmp_path / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "pytorch_model-1.bin"}}))
    with pytest.raises(UnsafeCheckpointError):
        torchkeep.load(tmp_path)
    assert not canary.exists()


# --- torch.save files -------------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_torch_save_state_dicts_and_tutorial_checkpoints(tmp_path: Path, legacy: bool) -> None:
    sd = fill_(BNNet(), 2).state_dict()
    ckpt = _tutorial()
    for name, obj in (("sd.pth", sd), ("ckpt.pt", ckpt)):
        path = tmp_path / name
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
        out = torchkeep.load(path)
        assert_same(obj, out)
    out = torchkeep.load(tmp_path / "sd.pth")
    assert isinstance(out, OrderedDict) and out._metadata == sd._metadata


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_torch_save_ties_survive(tmp_path: Path, legacy: bool) -> None:
    path = tmp_path / "tied.pt"
    torch.save(TiedLM().state_dict(), path, _use_new_zipfile_serialization=not legacy)
    out = torchkeep.load(path)
    assert out["emb.weight"].data_ptr() == out["out.weight"].data_ptr()


def test_tar_bundle_of_several_models(tmp_path: Path) -> None:
    """The tutorial's "saving multiple models in one file": torch.save to a .tar path."""
    a, b = fill_(MLP(), 1), fill_(BNNet(), 2)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1)
    path = tmp_path / "bundle.tar"
    torch.save(
        {
            "modelA_state_dict": a.state_dict(),
            "modelB_state_dict": b.state_dict(),
            "optimizerA_state_dict": opt_a.state_dict(),
        },
        path,
    )
    out = torchkeep.load(path)
    assert set(out) == {"modelA_state_dict", "modelB_state_dict", "optimizerA_state_dict"}
    a2, b2 = MLP(), BNNet()
    assert torchkeep.load_into(a2, path).entry == "modelA_state_dict"
    assert torchkeep.load_into(b2, path).entry == "modelB_state_dict"
    for m, m2 in ((a, a2), (b, b2)):
        for (k, v), v2 in zip(m.state_dict().items(), m2.state_dict().values(), strict=True):
            assert torch.equal(v, v2), k


def test_torch_file_written_under_other_globals_is_refused_with_names(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"w": torch.ones(1), "cfg": Opaque(3)}, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        torchkeep.load(path)
    assert "tests.models.Opaque" in info.value.globals
    assert "tests.models.Opaque" in str(info.value)
    assert "trust=True" in str(info.value)
    out = torchkeep.load(path, trust=True)
    assert out["cfg"] == Opaque(3) and torch.equal(out["w"], torch.ones(1))


def test_numpy_arrays_load_without_trust_other_numpy_objects_need_it(tmp_path: Path) -> None:
    import numpy as np

    path = tmp_path / "np.pt"
    torch.save({"arr": np.arange(3)}, path)
    assert torchkeep.load(path)["arr"].tolist() == [0, 1, 2]  # tests/format/test_foreign_values.py
    torch.save({"arr": np.arange(3), "gen": np.random.RandomState(0)}, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        torchkeep.load(path)
    assert any(g.startswith("numpy.random") for g in info.value.globals)
    assert torchkeep.load(path, trust=True)["arr"].tolist() == [0, 1, 2]


class _Boom:
    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.canary}",))


class _Popen:
    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple[Any, ...]:
        return (subprocess.call, (["touch", str(self.canary)],))


class _Eval:
    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple[Any, ...]:
        return (eval, (f"open({str(self.canary)!r}, 'w')",))


@pytest.mark.parametrize("payload", [_Boom, _Popen, _Eval], ids=["os.system", "subprocess", "eval"])
@pytest.mark.parametrize("layout", ["zip", "legacy", "bare-pickle", "tar-suffix"])
def test_malicious_pickles_never_run(tmp_path: Path, payload: type, layout: str) -> None:
    canary = tmp_path / "canary"
    obj = {"w": torch.ones(2), "evil": payload(canary)}
    path = tmp_path / ("evil.tar" if layout == "tar-suffix" else "evil.pt")
    if layout == "bare-pickle":
        path.write_bytes(pickle.dumps(payload(canary), protocol=2))
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=layout != "legacy")
    with pytest.raises(UnsafeCheckpointError) as info:
        torchkeep.load(path)
    assert info.value.globals or "refus" in str(info.value)
    assert "trust=True" in str(info.value)
    with pytest.raises(UnsafeCheckpointError):
        torchkeep.load_into(MLP(), path, strict=False)
    with pytest.raises(UnsafeCheckpointError):
        torchkeep.inspect(path)
    assert not canary.exists()


def test_scanner_bypass_still_meets_the_weights_only_gate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The static scan is a tripwire; with it blinded, torch's safe unpickler must still refuse,
    and torchkeep must not fall back to weights_only=False."""
    from torchkeep.format._pickle_files import PickleScan

    canary = tmp_path / "canary"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(1), "x": _Boom(canary)}, path)

    def blind(p: Any) -> PickleScan:
        return PickleScan(path=str(p), records=(), globals=(), unsafe=())

    calls: list[Any] = []
    real_load = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(_torchfile, "scan_file", blind)
    monkeypatch.setattr(_torchfile.torch, "load", spy)
    with pytest.raises(UnsafeCheckpointError):
        torchkeep.load(path)
    assert calls and all(w is True for w in calls)
    assert not canary.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_damaged_torch_files_never_fall_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, legacy: bool
) -> None:
    path = tmp_path / "x.pt"
    torch.save(_tutorial(), path, _use_new_zipfile_serialization=not legacy)
    data = path.read_bytes()
    calls: list[Any] = []
    real_load = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(_torchfile.torch, "load", spy)
    for cut in (len(data) // 3, len(data) // 2, len(data) - 50):
        path.write_bytes(data[:cut])
        with pytest.raises(CorruptCheckpointError):
            torchkeep.load(path)
    assert all(w is True for w in calls)


def test_full_model_pickle(tmp_path: Path) -> None:
    model = fill_(TiedLM(), 3)
    path = tmp_path / "model.pt"
    torch.save(model, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        torchkeep.load(path)
    assert "tests.models.TiedLM" in info.value.globals
    loaded = torchkeep.load(path, trust=True)
    assert isinstance(loaded, TiedLM) and loaded.out.weight is loaded.emb.weight


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torchscript_archives_are_programs_and_refused(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(MLP()), str(path))
    assert detect(path) is Format.TORCHSCRIPT
    with pytest.raises(UnsafeCheckpointError, match="torch.jit.load"):
        torchkeep.load(path)
    with pytest.raises(UnsafeCheckpointError):
        torchkeep.inspect(path)


def test_torch_export_archives_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "exported.pt2"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/archive_format", "pt2")
        z.writestr("archive/models/model.json", "{}")
    assert detect(path) is Format.TORCH_EXPORT
    with pytest.raises(UnsafeCheckpointError):
        torchkeep.load(path)


def test_torch_file_in_a_dir_is_found(tmp_path: Path) -> None:
    sd = fill_(MLP(), 9).state_dict()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    assert_same(sd, torchkeep.load(tmp_path))
    report = torchkeep.load_into(MLP(), tmp_path)
    assert report.ok


def test_load_into_from_torch_file_with_dtype_casting_module(tmp_path: Path) -> None:
    sd = {k: v.double() for k, v in fill_(MLP(), 4).state_dict().items()}
    path = tmp_path / "f64.pt"
    torch.save(sd, path)
    model = MLP()
    torchkeep.load_into(model, path)
    assert model.fc1.weight.dtype == torch.float32
    assert torch.equal(model.fc1.weight, sd["fc1.weight"].float())


def test_parameter_objects_in_torch_files(tmp_path: Path) -> None:
    obj = {"p": nn.Parameter(torch.ones(2))}
    path = tmp_path / "p.pt"
    torch.save(obj, path)
    out = torchkeep.load(path)
    assert isinstance(out["p"], nn.Parameter) and out["p"].requires_grad
