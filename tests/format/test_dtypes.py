"""Every torch dtype through a file: stored exactly, or refused with its name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

import torchkeep
from torchkeep import UnsupportedValueError

from ..helpers import SUFFIXES, random_tensor, roundtrip
from ..models import assert_same, same_bytes

ALL_DTYPES = sorted(
    {v for n in dir(torch) if isinstance(v := getattr(torch, n), torch.dtype)}, key=str
)


QUANTIZED = {torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4}


STORABLE_DTYPES = [d for d in ALL_DTYPES if d not in QUANTIZED]


SUB_BYTE = {getattr(torch, f"{p}int{i}") for p in ("", "u") for i in range(1, 8)}


NAMED_DTYPES = [
    torch.bfloat16,
    torch.float16,
    torch.float32,
    torch.float64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2fnuz,
    torch.float8_e8m0fnu,
    torch.bool,
    torch.complex32,
    torch.complex64,
    torch.complex128,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.uint16,
    torch.uint32,
    torch.uint64,
]


complex_half_ok = pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("dtype", NAMED_DTYPES, ids=str)
@complex_half_ok
def test_every_dtype_round_trips(tmp_path: Path, suffix: str, dtype: torch.dtype) -> None:
    obj = {
        "t": random_tensor((3, 5), dtype, seed=2),
        "scalar": random_tensor((), dtype, seed=3),
        "empty": random_tensor((0, 4), dtype),
        "strided": random_tensor((6, 4), dtype, seed=4)[::2, 1:],
    }
    out = roundtrip(obj, tmp_path / f"x{suffix}")
    expected = {k: v.contiguous() for k, v in obj.items()}
    assert_same(expected, out)


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("dtype", STORABLE_DTYPES, ids=str)
@complex_half_ok
def test_any_torch_dtype_round_trips_or_is_refused_cleanly(
    tmp_path: Path, suffix: str, dtype: torch.dtype
) -> None:
    obj = {"t": random_tensor((2, 3), dtype, seed=5)}
    path = tmp_path / f"x{suffix}"
    if suffix == ".pt" and dtype in SUB_BYTE:
        try:
            torchkeep.save(obj, path)
        except UnsupportedValueError as exc:
            assert str(dtype).removeprefix("torch.") in str(exc)
            assert not path.exists()
            return
    out = roundtrip(obj, path)
    assert out["t"].dtype == dtype
    assert same_bytes(obj["t"], out["t"])


@pytest.mark.parametrize("dtype", NAMED_DTYPES, ids=str)
@complex_half_ok
def test_every_dtype_readable_by_safetensors(tmp_path: Path, dtype: torch.dtype) -> None:
    t = random_tensor((4, 3), dtype, seed=6)
    path = tmp_path / "x.safetensors"
    torchkeep.save({"w": t}, path)
    plain = safetensors.torch.load_file(str(path))
    assert list(plain) == ["w"]
    # dtypes safetensors lacks are stored as their raw bytes
    if plain["w"].dtype == dtype:
        assert same_bytes(t, plain["w"])
    else:
        assert plain["w"].dtype == torch.uint8
        assert torch.equal(plain["w"].reshape(-1), t.reshape(-1).view(torch.uint8))


def test_loading_complex32_views_warns_nothing(tmp_path: Path) -> None:
    """Rebuilding a view allocated an empty complex32 tensor, and torch warned that the dtype is
    experimental: an error for users running with ``-W error``. Torch warns once per process,
    so a fresh one."""
    code = (
        "import sys, torch, torchkeep as tk\n"
        "x = torch.arange(16, dtype=torch.float32).view(torch.complex32)\n"
        "tk.save({'x': x, 'part': x[2:5]}, sys.argv[1])\n"
        "out = tk.load(sys.argv[1])\n"
        "assert torch.equal(out['part'].view(torch.float32), x[2:5].view(torch.float32))\n"
        "assert out['part'].untyped_storage().data_ptr() == out['x'].untyped_storage().data_ptr()\n"
    )
    path = tmp_path / "c.safetensors"
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", code, str(path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def test_a_view_whose_base_starts_between_its_elements_gets_the_right_bytes() -> None:
    """A base that starts 2 bytes into its storage, viewed as float32: copied, not floored."""
    from torchkeep.format._rebuild import _view_of

    base = torch.arange(8, dtype=torch.int16)[1:]
    view = {"offset": 4, "shape": [2], "stride": [1], "dtype": "float32"}
    out = _view_of(base, view, key="k", path=None)
    assert torch.equal(out.view(torch.int16), base[2:6])
