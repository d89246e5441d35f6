"""The static pickle scanner: it names what a file would import and never runs any of it."""

from __future__ import annotations

import builtins
import functools
import io
import operator
import os
import pickle
import pkgutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchkeep.errors import CheckpointNotFoundError, CorruptCheckpointError, UnsafeCheckpointError
from torchkeep.format import _pickle_scan
from torchkeep.format._pickle_allow import is_allowed_global
from torchkeep.format._pickle_files import TAR_FORMAT, PickleScan, scan_file
from torchkeep.format._pickle_scan import UNRESOLVED, scan_pickle_bytes

TORCH_GLOBALS = {
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor_v2",
    "torch.FloatStorage",
    "torch.LongStorage",
}


class Payload:
    """Pickles as a call of ``fn(*args)``, the way a malicious checkpoint does."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.fn = fn
        self.args = args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.fn, self.args)


def _payloads(canary: Path) -> dict[str, Payload]:
    """Objects whose unpickling would create ``canary``, keyed by the global they import."""
    c = str(canary)
    return {
        "posix.system" if os.name == "posix" else "nt.system": Payload(os.system, f"touch {c}"),
        "subprocess.Popen": Payload(subprocess.Popen, ["touch", c]),
        "builtins.eval": Payload(eval, f"open({c!r}, 'w')"),
        "builtins.exec": Payload(exec, f"open({c!r}, 'w')"),
        "builtins.getattr": Payload(getattr, Payload(__import__, "os"), "system"),
        "operator.methodcaller": Payload(operator.methodcaller, "system", f"touch {c}"),
        "functools.partial": Payload(functools.partial, os.system, f"touch {c}"),
        "pkgutil.resolve_name": Payload(pkgutil.resolve_name, "os:system"),
        "_io.FileIO": Payload(io.FileIO, c, "w"),
    }


def _handcrafted(canary: Path) -> dict[str, bytes]:
    """Protocol 0-2 opcodes written by hand; ``expect`` globals are the keys."""
    touch = f"touch {canary}".encode()
    return {
        "os.system": b"cos\nsystem\n(S'" + touch + b"'\ntR.",
        "builtins.eval": b"c__builtin__\neval\n(S'1'\ntR.",  # Python 2 name, mapped
        # getattr(__import__('os'), 'system')('touch ...'): a getattr chain
        "builtins.getattr builtins.__import__": b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n"
        b"(S'os'\ntRS'system'\ntR(S'" + touch + b"'\ntR.",
        "subprocess.Popen": b"((lS'touch'\naS'" + str(canary).encode() + b"'\na"
        b"isubprocess\nPopen\n.",  # INST
    }


def _stack_global(module: str, name: str, arg: str) -> bytes:
    """Protocol 4: the operands memoized, popped, then fetched back with BINGET."""

    def s(text: str) -> bytes:
        data = text.encode()
        return b"\x8c" + bytes([len(data)]) + data

    return (
        b"\x80\x04"
        + s(module)
        + b"\x94"  # MEMOIZE -> 0
        + b"0"  # POP
        + s(name)
        + b"q\x05"  # BINPUT 5
        + b"0"
        + b"h\x00h\x05\x93"  # BINGET 0, BINGET 5, STACK_GLOBAL
        + s(arg)
        + b"\x85R."  # TUPLE1, REDUCE, STOP
    )


def _trained_checkpoint() -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(  # BatchNorm's num_batches_tracked is an int64 buffer
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = model(torch.randn(16, 4)).pow(2).mean()
    loss.backward()
    optimizer.step()
    return {
        "epoch": 3,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "loss": loss.detach(),
    }


# -- ordinary torch.save files ------------------------------------------------------------------


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_state_dict_and_training_checkpoint_are_safe(tmp_path: Path, zip_format: bool) -> None:
    checkpoint = _trained_checkpoint()
    for name, obj in [("sd.pt", checkpoint["model_state_dict"]), ("ck.pt", checkpoint)]:
        path = tmp_path / name
        torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
        scan = scan_file(path)
        assert isinstance(scan, PickleScan)
        assert scan.is_safe, scan.unsafe
        assert set(scan.globals) == TORCH_GLOBALS
        assert all(is_allowed_global(g) for g in scan.globals)
        if zip_format:
            assert scan.records == (f"{path.stem}/data.pkl",)
        else:
            assert scan.records == tuple(f"<pickle {i}>" for i in range(5))
        assert scan.to_dict() == {
            "path": str(path),
            "records": list(scan.records),
            "globals": list(scan.globals),
            "unsafe": [],
            "rebuilt": [],
            "is_safe": True,
        }
        torch.load(path, weights_only=True)  # agrees with the real gate


def test_legacy_scan_stops_after_the_fifth_pickle(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(1000)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    globals_, end = scan_pickle_bytes(data, max_pickles=5)
    assert set(globals_) <= TORCH_GLOBALS
    assert end < len(data) - 4000  # the raw float32 storage follows, unparsed
    first, first_end = scan_pickle_bytes(data)
    assert first == [] and 0 < first_end < end  # the magic number is a plain int


def test_other_allowed_values(tmp_path: Path) -> None:
    path = tmp_path / "misc.pt"
    torch.save(
        {"dtype": torch.float16, "device": torch.device("cpu"), "size": torch.Size([2])}, path
    )
    scan = scan_file(path)
    assert scan.globals == ("torch.float16", "torch.device", "torch.Size")
    assert scan.is_safe


def test_whole_module_is_flagged(tmp_path: Path) -> None:
    path = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    scan = scan_file(path)
    assert scan.unsafe == ("torch.nn.modules.linear.Linear",)
    with torch.serialization.safe_globals([torch.nn.Linear]):
        assert scan_file(path).is_safe


def test_is_allowed_global() -> None:
    for name in ["torch.float32", "torch.bfloat16", "torch.FloatStorage", "torch.Size"]:
        assert is_allowed_global(name), name
    for name in ["torch.storage.UntypedStorage", "collections.OrderedDict", "builtins.set"]:
        assert is_allowed_global(name), name
    for name in ["os.system", "posix.system", "builtins.eval", "torch.load", UNRESOLVED]:
        assert not is_allowed_global(name), name
    with torch.serialization.safe_globals([(Payload, "my.Payload"), operator.methodcaller]):
        assert is_allowed_global("my.Payload")
        assert is_allowed_global("operator.methodcaller")
    assert not is_allowed_global("operator.methodcaller")
    with torch.serialization.safe_globals([os.system, (os.getcwd, "os.getcwd")]):
        assert not is_allowed_global("posix.system")  # torch blocks these modules regardless
        assert not is_allowed_global("os.getcwd")


# -- malicious files ----------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_reduce_payloads_in_bare_pickles(tmp_path: Path, protocol: int) -> None:
    canary = tmp_path / "CANARY"
    for expected, payload in _payloads(canary).items():
        path = tmp_path / f"{expected}.pkl"
        path.write_bytes(pickle.dumps(payload, protocol=protocol))
        scan = scan_file(path)
        assert expected in scan.unsafe, (expected, scan)
        assert not scan.is_safe
        assert expected in scan_pickle_bytes(path.read_bytes())[0]
    assert not canary.exists()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_reduce_payloads_inside_torch_save(tmp_path: Path, zip_format: bool) -> None:
    canary = tmp_path / "CANARY"
    for expected, payload in _payloads(canary).items():
        path = tmp_path / "evil.pt"
        state = {"weight": torch.ones(2), "extra": payload}
        torch.save(state, path, _use_new_zipfile_serialization=zip_format)
        scan = scan_file(path)
        assert expected in scan.unsafe, (expected, scan)
        assert "torch._utils._rebuild_tensor_v2" in scan.globals
        assert "torch._utils._rebuild_tensor_v2" not in scan.unsafe
    assert not canary.exists()


def test_handcrafted_opcodes(tmp_path: Path) -> None:
    canary = tmp_path / "CANARY"
    for expected, data in _handcrafted(canary).items():
        path = tmp_path / "evil.pkl"
        path.write_bytes(data)
        scan = scan_file(path)
        for name in expected.split():
            assert name in scan.unsafe, (name, scan)
    assert not canary.exists()


@pytest.mark.parametrize(
    ("module", "name"),
    [("os", "system"), ("posix", "system"), ("builtins", "eval"), ("builtins", "exec")]
    + [("subprocess", "Popen"), ("pkgutil", "resolve_name"), ("_io", "FileIO")],
)
def test_stack_global_with_memoized_operands(tmp_path: Path, module: str, name: str) -> None:
    canary = tmp_path / "CANARY"
    data = _stack_global(module, name, f"touch {canary}")
    assert scan_pickle_bytes(data) == ([f"{module}.{name}"], len(data))
    path = tmp_path / "evil.pkl"
    path.write_bytes(data)
    assert scan_file(path).unsafe == (f"{module}.{name}",)
    assert not canary.exists()


def test_stack_global_reuses_memoized_module_name() -> None:
    data = pickle.dumps([Payload(eval, "1"), Payload(exec, "1")], protocol=4)
    assert data.count(b"builtins") == 1  # the second payload fetches it from the memo
    assert scan_pickle_bytes(data)[0] == ["builtins.eval", "builtins.exec"]


def test_unresolvable_stack_global_is_unsafe() -> None:
    computed = b"\x80\x04))\x93)R."  # operands that are not strings
    assert scan_pickle_bytes(computed)[0] == [UNRESOLVED]
    from_missing_memo = b"\x80\x04h\x07h\x08\x93)R."
    assert scan_pickle_bytes(from_missing_memo)[0] == [UNRESOLVED]
    assert not is_allowed_global(UNRESOLVED)


def test_pre_0_4_tar_format_is_flagged_not_parsed(tmp_path: Path) -> None:
    # torch.load tries this format before the pickle sequence; a tar header can hide anything
    path = tmp_path / "old.pt"
    with tarfile.open(path, "w:", format=tarfile.PAX_FORMAT) as tar:
        data = pickle.dumps(Payload(os.system, "true"), protocol=2)
        member = tarfile.TarInfo("pickle")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    scan = scan_file(path)
    assert scan.records == ("<tar archive>",)
    assert scan.unsafe == (TAR_FORMAT,)


def test_scanning_imports_nothing(tmp_path: Path) -> None:
    path = tmp_path / "evil.pkl"
    path.write_bytes(b"ctorchkeep_canary_module\nboom\n)R.")
    assert scan_file(path).unsafe == ("torchkeep_canary_module.boom",)
    assert "torchkeep_canary_module" not in sys.modules


def test_global_name_is_taken_raw_like_pickle_does() -> None:
    # pickletools would undo the escape and say builtins.eval; pickle looks up the raw name
    assert scan_pickle_bytes(b"cbuiltins\nev\\x61l\n.")[0] == ["builtins.ev\\x61l"]
    # escapes pickletools cannot undo, and non-ASCII names, are reported rather than fatal
    assert scan_pickle_bytes(b"cbuiltins\neva\\\n)R.")[0] == ["builtins.eva\\"]
    assert scan_pickle_bytes("cm\u00f3d\nf\n.".encode())[0] == ["m\u00f3d.f"]
    assert scan_pickle_bytes(b"(im\\\nf\n.")[0] == ["m\\.f"]  # INST


# -- broken files -------------------------------------------------------------------------------


def test_payload_before_breakage_is_unsafe(tmp_path: Path) -> None:
    canary = tmp_path / "CANARY"
    data = b"cos\nsystem\n(S'touch " + str(canary).encode() + b"'\ntR\xff"
    with pytest.raises(UnsafeCheckpointError) as info:
        scan_pickle_bytes(data)
    assert info.value.globals == ["os.system"]
    path = tmp_path / "evil.pkl"
    path.write_bytes(data[:-1])  # truncated, no STOP
    with pytest.raises(UnsafeCheckpointError, match="os.system") as info:
        scan_file(path)
    assert info.value.path == str(path)
    assert not canary.exists()


def test_payload_then_broken_zip_record_is_unsafe(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", b"\x80\x02cbuiltins\nexec\nq\x00")
    with pytest.raises(UnsafeCheckpointError, match="builtins.exec"):
        scan_file(path)


@pytest.mark.parametrize(
    "data",
    [b"", b"\xff\xfe not a pickle", b"ccollections\nOrderedDict\n)R", b"\x80\x02}q\x00(X"],
    ids=["empty", "garbage", "safe-global-truncated", "truncated"],
)
def test_corrupt_bytes(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "bad.pt"
    path.write_bytes(data)
    with pytest.raises(CorruptCheckpointError) as info:
        scan_file(path)
    assert info.value.path == str(path)
    assert info.value.hint
    assert str(path) in str(info.value)


def test_trailing_garbage_after_a_bare_pickle_is_corrupt() -> None:
    with pytest.raises(CorruptCheckpointError, match="<pickle 1>"):
        scan_pickle_bytes(pickle.dumps(1, protocol=2) + b"\xff", max_pickles=5)


def test_truncated_zip(tmp_path: Path) -> None:
    path = tmp_path / "sd.pt"
    torch.save(_trained_checkpoint(), path)
    data = path.read_bytes()
    for cut in [len(data) // 2, len(data) - 10, 30]:
        path.write_bytes(data[:cut])
        with pytest.raises(CorruptCheckpointError):
            scan_file(path)


def test_zip_without_pickle_or_with_broken_pickle(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x/version", b"3\n")
    with pytest.raises(CorruptCheckpointError, match=r"no \.pkl record"):
        scan_file(path)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x/data.pkl", b"\x80\x02}q\x00(X")
    with pytest.raises(CorruptCheckpointError, match="x/data.pkl"):
        scan_file(path)


def test_zip_bomb_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_pickle_scan, "MAX_RECORD_BYTES", 1000)
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("bomb/data.pkl", b"\x80\x02" + b"N0" * 100_000 + b"N.")
    assert path.stat().st_size < 5000
    with pytest.raises(CorruptCheckpointError, match="zip bomb"):
        scan_file(path)


def test_missing_path_and_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError) as info:
        scan_file(tmp_path / "nope.pt")
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(CorruptCheckpointError, match="directory"):
        scan_file(tmp_path)


def test_bad_argument() -> None:
    with pytest.raises(ValueError, match="max_pickles"):
        scan_pickle_bytes(b"N.", max_pickles=0)


# -- fuzzing ------------------------------------------------------------------------------------

_VALID = pickle.dumps({"a": [1, 2.5, "x", None, (True, b"y")]}, protocol=2)
_VALID4 = pickle.dumps([Payload(builtins.print, "x"), {"k": 1}], protocol=4)


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from([_VALID, _VALID4])))
    for _ in range(draw(st.integers(1, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(st.binary(max_size=300), _mutated()), max_pickles=st.integers(1, 5))
def test_random_bytes_never_escape_as_other_errors(data: bytes, max_pickles: int) -> None:
    try:
        globals_, end = scan_pickle_bytes(data, max_pickles=max_pickles)
    except (CorruptCheckpointError, UnsafeCheckpointError):
        return
    assert 0 < end <= len(data)
    assert all(isinstance(g, str) for g in globals_)
