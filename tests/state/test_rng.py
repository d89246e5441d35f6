"""RNGState: Python, NumPy, torch CPU and CUDA generators captured and restored exactly."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from numpy.random.mtrand import get_bit_generator, set_bit_generator

import torchkeep
from torchkeep import IncompatibleStateError, RNGState
from torchkeep.format import flatten


@pytest.fixture(autouse=True)
def _keep_global_rngs() -> Iterator[None]:
    """Leave the process's generators as each test found them."""
    python, bit_generator = random.getstate(), get_bit_generator()
    numpy_state, torch_state = np.random.get_state(legacy=False), torch.get_rng_state()
    yield
    random.setstate(python)
    set_bit_generator(bit_generator)
    np.random.set_state(numpy_state)
    torch.set_rng_state(torch_state)


def draws() -> list[Any]:
    """Numbers from every generator, including the cached second normal of each Gaussian."""
    return [
        [random.random() for _ in range(5)],
        random.gauss(0.0, 1.0),
        random.randrange(10**9),
        np.random.rand(5).tolist(),
        np.random.randn(3).tolist(),
        np.random.randint(0, 10**9, size=3).tolist(),
        torch.rand(5).tolist(),
        torch.randn(3).tolist(),
    ]


def seeded_and_mid_gauss() -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0.0, 1.0)  # leaves a cached normal in Python's generator
    np.random.randn(1)  # and in NumPy's (has_gauss=1)


def test_round_trip_repeats_every_sequence() -> None:
    seeded_and_mid_gauss()
    rng = RNGState()
    state = rng.state_dict()
    assert set(state) == {"python", "numpy", "torch"}  # no CUDA initialized here
    assert state["python"]["gauss"] is not None and state["numpy"]["has_gauss"] == 1
    first = draws()
    draws()  # move every generator on
    rng.load_state_dict(state)
    assert draws() == first


def test_state_holds_only_storable_values() -> None:
    state = RNGState().state_dict()
    flatten(state)  # raises on anything torchkeep cannot store
    assert state["python"]["state"].dtype == torch.uint32
    assert state["python"]["state"].shape == (625,)
    assert state["numpy"]["state"]["key"].dtype == torch.uint32
    assert state["torch"].dtype == torch.uint8


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_state_survives_a_file(tmp_path: Path, suffix: str) -> None:
    seeded_and_mid_gauss()
    path = tmp_path / f"rng{suffix}"
    torchkeep.save({"rng": RNGState().state_dict()}, path)
    first = draws()
    draws()
    RNGState().load_state_dict(torchkeep.load(path)["rng"])
    assert draws() == first


def test_flags_exclude_sources() -> None:
    rng = RNGState(python=False, numpy=False, cuda=False)
    assert rng.sources == ("torch",)
    assert repr(rng) == "RNGState(python=False, numpy=False, torch=True, cuda=False)"
    torch.manual_seed(0)
    state = rng.state_dict()
    assert set(state) == {"torch"}
    expected = torch.rand(3)
    random.seed(5)
    python_next = random.random()
    random.seed(5)
    rng.load_state_dict(state)
    assert torch.equal(torch.rand(3), expected)
    assert random.random() == python_next  # Python's generator was left alone


def test_numpy_global_generator_of_another_kind() -> None:
    set_bit_generator(np.random.PCG64(7))
    state = RNGState(python=False, torch=False).state_dict()
    assert state["numpy"]["bit_generator"] == "PCG64"
    expected = np.random.rand(4).tolist()
    set_bit_generator(np.random.MT19937(0))
    RNGState(python=False, torch=False).load_state_dict(state)
    assert type(get_bit_generator()).__name__ == "PCG64"
    assert np.random.rand(4).tolist() == expected


def test_first_layout_is_still_read() -> None:
    np.random.seed(4)
    legacy = np.random.get_state(legacy=False)
    old = {
        "bit_generator": "MT19937",
        "key": legacy["state"]["key"],
        "pos": legacy["state"]["pos"],
        "has_gauss": 0,
        "gauss": 0.0,
    }
    expected = np.random.rand(3).tolist()
    RNGState(python=False, torch=False).load_state_dict({"numpy": old})
    assert np.random.rand(3).tolist() == expected


def corrupt(state: dict[str, Any], where: str) -> dict[str, Any]:
    if where == "not a dict":
        return [1, 2]  # type: ignore[return-value]
    if where == "python length":
        state["python"]["state"] = state["python"]["state"][:10]
    elif where == "python kind":
        state["python"] = "abc"
    elif where == "numpy generator":
        state["numpy"]["bit_generator"] = "os.system"
    elif where == "numpy key":
        state["numpy"]["state"]["key"] = torch.zeros(3, dtype=torch.uint32)
    elif where == "torch dtype":
        state["torch"] = state["torch"].float()
    elif where == "torch size":
        state["torch"] = state["torch"][:100]
    return state


@pytest.mark.parametrize(
    "where",
    [
        "not a dict",
        "python length",
        "python kind",
        "numpy generator",
        "numpy key",
        "torch dtype",
        "torch size",
    ],
)
def test_malformed_state_raises_and_changes_nothing(where: str) -> None:
    random.seed(10)
    np.random.seed(11)
    torch.manual_seed(12)
    state = corrupt(RNGState().state_dict(), where)
    random.seed(20)
    np.random.seed(21)
    torch.manual_seed(22)
    before = draws()
    random.seed(20)
    np.random.seed(21)
    torch.manual_seed(22)
    with pytest.raises(IncompatibleStateError, match="malformed") as info:
        RNGState().load_state_dict(state)
    assert info.value.hint
    assert draws() == before  # all or nothing: even the sources before the bad one are intact


def test_source_absent_from_the_checkpoint_warns() -> None:
    state = RNGState(numpy=False).state_dict()
    state["mps"] = torch.zeros(4, dtype=torch.uint8)
    with pytest.warns(UserWarning, match=r"numpy \(absent from the checkpoint\).*'mps'"):
        RNGState().load_state_dict(state)


class FakeCuda:
    """Stands in for torch.cuda: ``count`` devices, each with a 16-byte generator state."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, count: int, *, initialized: bool) -> None:
        self.states = [torch.full((16,), i, dtype=torch.uint8) for i in range(count)]
        self.initialized = initialized
        self.set_calls: list[int] = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: self.initialized)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", self.get_all)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", self.set_all)

    def get_all(self) -> list[torch.Tensor]:
        assert self.initialized, "RNGState must not initialize CUDA"
        return [s.clone() for s in self.states]

    def set(self, state: torch.Tensor, device: int) -> None:
        self.set_calls.append(device)
        self.states[device] = state.clone()

    def set_all(self, states: list[torch.Tensor]) -> None:
        self.states = [s.clone() for s in states]


def test_cuda_generators_are_captured_when_cuda_is_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = FakeCuda(monkeypatch, 2, initialized=True)
    state = RNGState().state_dict()
    assert [s[0].item() for s in state["cuda"]] == [0, 1]
    cuda.states = [torch.full((16,), 9, dtype=torch.uint8) for _ in range(2)]
    RNGState().load_state_dict(state)
    assert cuda.set_calls == [0, 1]
    assert [s[0].item() for s in cuda.states] == [0, 1]


def test_cuda_is_not_initialized_to_capture_it(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeCuda(monkeypatch, 2, initialized=False)
    assert "cuda" not in RNGState().state_dict()  # FakeCuda.get_all would have failed


def test_fewer_cuda_devices_restore_what_fits_and_warn(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeCuda(monkeypatch, 2, initialized=True)
    state = RNGState().state_dict()
    one = FakeCuda(monkeypatch, 1, initialized=False)
    with pytest.warns(UserWarning, match=r"cuda:1 \(saved on 2 CUDA devices, this process has 1"):
        RNGState().load_state_dict(state)
    assert one.set_calls == [0]  # queued by torch until CUDA starts; nothing initialized
    FakeCuda(monkeypatch, 0, initialized=False)
    with pytest.warns(UserWarning, match=r"cuda:0, cuda:1 \(saved on 2 CUDA devices.* none"):
        RNGState().load_state_dict(state)


def test_more_cuda_devices_warn_about_the_extra_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeCuda(monkeypatch, 1, initialized=True)
    state = RNGState().state_dict()
    three = FakeCuda(monkeypatch, 3, initialized=True)
    with pytest.warns(UserWarning, match=r"cuda:1, cuda:2 \(saved on 1"):
        RNGState().load_state_dict(state)
    assert three.set_calls == [0]


def test_cuda_excluded_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeCuda(monkeypatch, 2, initialized=True)
    state = RNGState().state_dict()
    cpu = FakeCuda(monkeypatch, 0, initialized=False)
    RNGState(cuda=False).load_state_dict(state)  # no warning: the caller left CUDA out
    assert cpu.set_calls == []
