"""Harmless values in files made by others load without ``trust``; anything else stays refused.

The corpus comes from the real peers (the Hugging Face Trainer's ``rng_state.pth``, Accelerate's
``random_states_0.pkl``, a Lightning ``.ckpt`` with a ``pathlib`` hyperparameter, the tutorials'
``torch.__version__``), made in a fresh process, plus hand-made equivalents written with
``torch.save`` here. Each value must come back equal to what the peer's own (trusting) load gives.
"""

from __future__ import annotations

import codecs
import importlib.util
import os
import pathlib
import pickle
import random
import subprocess
import sys
import textwrap
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.torch_version import TorchVersion

import torchkeep as tk
from torchkeep import CorruptCheckpointError, UnsafeCheckpointError
from torchkeep.format._safe_values import SAFE_VALUE_GLOBALS

from ..models import assert_same
from .test_skeleton import VALUES, same_value

MAKE_CORPUS = textwrap.dedent(
    """
    import os, pathlib, sys, warnings
    warnings.simplefilter("ignore")
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    out = pathlib.Path(sys.argv[1])

    torch.save({"epoch": 1, "pytorch_version": torch.__version__}, out / "tutorial.pt")

    from accelerate import Accelerator
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 2)
    accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    accelerator.save_state(str(out / "accelerate"))

    from transformers import BertConfig, BertForSequenceClassification, Trainer
    from transformers import TrainingArguments
    config = BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=8, max_position_embeddings=16)

    class Data(torch.utils.data.Dataset):
        def __len__(self): return 4
        def __getitem__(self, i):
            return {"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor(i % 2)}

    args = TrainingArguments(output_dir=str(out / "hf"), max_steps=2, save_steps=1, use_cpu=True,
                             per_device_train_batch_size=2, report_to=[], logging_strategy="no",
                             disable_tqdm=True)
    Trainer(model=BertForSequenceClassification(config), args=args, train_dataset=Data()).train()

    import pytorch_lightning as pl

    class Module(pl.LightningModule):
        def __init__(self, data_dir=pathlib.Path("/data/set"), lr=0.1):
            super().__init__()
            self.save_hyperparameters()
            self.layer = torch.nn.Linear(2, 1)
        def training_step(self, batch, i): return self.layer(batch[0]).sum()
        def configure_optimizers(self): return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 2)), batch_size=2)
    pl.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_checkpointing=True,
               enable_model_summary=False, accelerator="cpu", default_root_dir=str(out / "pl")).fit(Module(), data)
    """
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for peer in ("transformers", "accelerate", "pytorch_lightning"):  # test-only dependencies
        # dev dependencies, installed by make: a missing one is a broken install, not a skip
        assert importlib.util.find_spec(peer), f"{peer} is not installed: pip install -e '.[dev]'"
    out = tmp_path_factory.mktemp("peers")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_DISABLED": "1"}
    made = subprocess.run(
        [sys.executable, "-c", MAKE_CORPUS, str(out)],
        env=env,
        cwd=out,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if made.returncode:
        pytest.fail(f"the peers could not write their files:\n{made.stderr[-3000:]}")
    return out


@pytest.fixture(autouse=True)
def _keep_global_rng() -> Iterator[None]:
    """These tests set the global generators; leave them as they were."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])


def trusted(path: Path) -> Any:
    return torch.load(path, weights_only=False)


def use_rng_states(python: Any, numpy: Any, torch_state: torch.Tensor) -> None:
    """The states work with the setters and give the same draws as the trusted ones."""
    random.setstate(python)
    np.random.set_state(numpy)
    torch.set_rng_state(torch_state)


PEER_FILES = {
    "tutorial": "tutorial.pt",
    "hf-rng": "hf/checkpoint-1/rng_state.pth",
    "accelerate-rng": "accelerate/random_states_0.pkl",
    "lightning": "pl/checkpoints/epoch=0-step=1.ckpt",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PEER_FILES))
def test_peer_files_load_without_trust_and_equal_the_trusted_load(corpus: Path, name: str) -> None:
    path = corpus / PEER_FILES[name]
    loaded = tk.load(path)
    assert_same(trusted(path), loaded)
    if name == "tutorial":
        assert type(loaded["pytorch_version"]) is TorchVersion
        assert loaded["pytorch_version"] == torch.__version__
        assert loaded["pytorch_version"] >= "2.0"  # TorchVersion compares as a version
    elif name == "hf-rng":
        assert loaded["numpy"][1].dtype == np.uint32 and loaded["numpy"][1].shape == (624,)
        use_rng_states(loaded["python"], loaded["numpy"], loaded["cpu"])
    elif name == "accelerate-rng":
        use_rng_states(
            loaded["random_state"], loaded["numpy_random_seed"], loaded["torch_manual_seed"]
        )
    else:
        assert loaded["hyper_parameters"]["data_dir"] == pathlib.Path("/data/set")
        assert type(loaded["hyper_parameters"]["data_dir"]) is type(pathlib.Path("/data/set"))


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("name", list(PEER_FILES))
def test_peer_values_round_trip_through_our_formats(
    corpus: Path, name: str, suffix: str, tmp_path: Path
) -> None:
    loaded = tk.load(corpus / PEER_FILES[name])
    tk.save(loaded, tmp_path / f"again{suffix}")
    assert_same(loaded, tk.load(tmp_path / f"again{suffix}"))


@pytest.mark.slow
def test_rng_states_restore_the_same_draws(corpus: Path) -> None:
    path = corpus / PEER_FILES["hf-rng"]
    draws = []
    for state in (trusted(path), tk.load(path)):
        use_rng_states(state["python"], state["numpy"], state["cpu"])
        draws.append((random.random(), np.random.rand(), torch.rand(1).item()))
    assert draws[0] == draws[1]


@pytest.mark.slow
def test_load_into_reads_a_lightning_checkpoint_with_path_hyperparameters(corpus: Path) -> None:
    class Module(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

    module = Module()
    report = tk.load_into(module, corpus / PEER_FILES["lightning"])
    assert sorted(report.loaded) == ["layer.bias", "layer.weight"]
    expected = trusted(corpus / PEER_FILES["lightning"])["state_dict"]
    assert torch.equal(module.layer.weight, expected["layer.weight"])


@pytest.mark.slow
def test_training_args_stay_refused_with_their_names(corpus: Path) -> None:
    with pytest.raises(UnsafeCheckpointError) as info:
        tk.load(corpus / "hf/checkpoint-1/training_args.bin")
    assert "transformers.training_args.TrainingArguments" in info.value.globals
    assert "transformers.training_args.TrainingArguments" in str(info.value)
    assert not any(g.startswith(("numpy", "pathlib", "torch.")) for g in info.value.globals)


# ---- hand-made equivalents -------------------------------------------------------------------


def _rng_states() -> dict[str, Any]:
    rng = np.random.RandomState(7)
    return {
        "python": random.Random(3).getstate(),
        "numpy": rng.get_state(),
        "cpu": torch.Generator().manual_seed(5).get_state(),
    }


HAND_MADE: dict[str, Any] = {
    "torch_version": lambda: {"pytorch_version": torch.__version__, "epoch": 3},
    "paths": lambda: {
        "path": pathlib.Path("/data/x"),
        "posix": pathlib.PurePosixPath("rel/y"),
        "windows": pathlib.PureWindowsPath("C:/Users/x"),
    },
    "rng_states": _rng_states,
    "arrays": lambda: {
        "u4": np.arange(624, dtype=np.uint32),
        "f2": np.linspace(0, 1, 5, dtype=np.float16),
        "bool": np.array([[True, False]]),
        "c16": np.array([1 + 2j]),
        "u8": np.array([2**64 - 1], dtype=np.uint64),
        "big-endian": np.arange(4, dtype=">i4"),
        "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "0-d": np.array(2.5),
        "empty": np.zeros((0, 3), dtype=np.int16),
        "longdouble": np.array([1, 2], dtype=np.longdouble) / 3,
        "unicode": np.array(["héllo", "x"]),
        "bytes": np.array([b"ab", b"c"]),
    },
    "scalars": lambda: {
        "f8": np.float64(0.1),
        "f4": np.float32(1.5),
        "i1": np.int8(-3),
        "u2": np.uint16(65535),
        "bool": np.bool_(True),
        "c8": np.complex64(1 - 1j),
        "nan": np.float64("nan"),
        "str": np.str_("abc"),
        "empty-str": np.str_(""),  # dtype <U0, found by hypothesis
        "empty-bytes": np.bytes_(b""),
        "longdouble": np.longdouble(1) / 3,
    },
    "dtypes": lambda: {"u4": np.dtype("uint32"), "be": np.dtype(">f8"), "s": np.dtype("S3")},
    "mixed": lambda: {"w": torch.ones(2), "b": b"\x00\xff", "a": [np.int64(1), np.zeros(2)]},
    "empty-bytes": lambda: {"b": b"", "a": np.zeros(0)},  # protocol 2 pickles b"" as bytes()
}


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("kind", list(HAND_MADE))
def test_hand_made_files_load_without_trust(kind: str, legacy: bool, tmp_path: Path) -> None:
    obj = HAND_MADE[kind]()
    path = tmp_path / "x.pt"
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    assert_same(obj, tk.load(path))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("kind", list(HAND_MADE))
def test_hand_made_values_round_trip_through_our_formats(
    kind: str, suffix: str, tmp_path: Path
) -> None:
    obj = HAND_MADE[kind]()
    tk.save(obj, tmp_path / f"x{suffix}")
    assert_same(obj, tk.load(tmp_path / f"x{suffix}"))


def test_our_pt_files_load_in_plain_torch_with_numpy_allowlisted(tmp_path: Path) -> None:
    """What plain torch needs for our .pt files holding numpy values (as for the peers' files)."""
    obj = HAND_MADE["rng_states"]()
    tk.save(obj, tmp_path / "rng.pt")
    with torch.serialization.safe_globals(
        [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]
    ):
        assert_same(obj, torch.load(tmp_path / "rng.pt", weights_only=True))


def test_the_allowlist_is_ours_only_while_loading(tmp_path: Path) -> None:
    """torch's allowlist is process-wide: a load leaves the user's entries as they were, and a
    user entry under one of our names (numpy's real class) does not mix with our stubs."""
    obj = HAND_MADE["rng_states"]()
    torch.save(obj, tmp_path / "rng.pt")
    outside = set(torch.serialization.get_safe_globals())
    assert_same(obj, tk.load(tmp_path / "rng.pt"))
    assert set(torch.serialization.get_safe_globals()) == outside
    with torch.serialization.safe_globals([np.ndarray, os.path.join]):
        inside = set(torch.serialization.get_safe_globals())
        assert_same(obj, tk.load(tmp_path / "rng.pt"))
        assert set(torch.serialization.get_safe_globals()) == inside
    with pytest.raises(pickle.UnpicklingError):  # plain torch is not given our allow-list
        torch.load(tmp_path / "rng.pt", weights_only=True)


def test_values_in_attributes_are_rebuilt_too(tmp_path: Path) -> None:
    """BUILD gives a state dict (OrderedDict) and a tensor python attributes: numpy values there
    come back as values, not as torchkeep's stubs."""
    sd: OrderedDict[str, Any] = OrderedDict(w=torch.ones(1))
    sd._metadata = {"": {"version": 2, "seed": np.uint32(7), "key": np.arange(2)}}  # type: ignore[attr-defined]
    param = torch.nn.Parameter(torch.ones(2))
    sd.extra = np.arange(3)  # type: ignore[attr-defined]
    param.stats = np.arange(2.0)  # type: ignore[attr-defined]
    torch.save({"sd": sd, "p": param}, tmp_path / "x.pt")
    out = tk.load(tmp_path / "x.pt")
    assert_same(sd._metadata, out["sd"]._metadata)  # type: ignore[attr-defined]
    assert_same(sd.extra, out["sd"].extra)  # type: ignore[attr-defined]
    assert_same(param.stats, out["p"].stats)  # type: ignore[attr-defined]


def test_restored_numpy_state_gives_the_same_draws(tmp_path: Path) -> None:
    rng = np.random.RandomState(11)
    torch.save({"numpy": rng.get_state()}, tmp_path / "rng.pt")
    expected = rng.rand(3)
    np.random.set_state(tk.load(tmp_path / "rng.pt")["numpy"])
    assert np.array_equal(np.random.rand(3), expected)


# ---- still refused ---------------------------------------------------------------------------


class Reduce:
    """Pickles as ``fn(*args)`` (then ``BUILD state`` when given): hand-written hostile values."""

    def __init__(self, fn: Any, args: tuple[Any, ...], state: Any = None) -> None:
        self.fn, self.args, self.state = fn, args, state

    def __reduce__(self) -> Any:
        if self.state is None:
            return (self.fn, self.args)
        return (self.fn, self.args, self.state)


def _reconstruct() -> Any:
    return np._core.multiarray._reconstruct


REFUSED = {
    "os.system": (lambda: Reduce(os.system, ("true",)), f"{os.system.__module__}.system"),
    "numpy.load": (lambda: Reduce(np.load, ("x.npy",)), "numpy.load"),
    "rot13": (lambda: Reduce(codecs.encode, ("text", "rot13")), "_codecs.encode"),
    "codecs-of-a-value": (lambda: Reduce(codecs.encode, (b"x", "hex")), "_codecs.encode"),
    "object-array": (lambda: np.array([1, "x"], dtype=object), "O8"),
    "structured": (lambda: np.zeros(2, dtype=[("a", "<i4")]), "V4"),
    "subtype": (lambda: Reduce(_reconstruct(), (np.dtype, (0,), b"b")), "_reconstruct"),
    "random-state-object": (lambda: np.random.RandomState(0), "numpy.random"),
}


@pytest.mark.parametrize("kind", list(REFUSED))
def test_other_values_stay_refused_with_their_names(kind: str, tmp_path: Path) -> None:
    make, name = REFUSED[kind]
    path = tmp_path / "x.pt"
    # beside an allow-listed value, so that only the allow-list could have let the file through
    torch.save({"rng": np.random.get_state(), "v": torch.__version__, "x": make()}, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        tk.load(path)
    assert name in str(info.value)
    assert "trust=True" in str(info.value)


def _dtype_state(code: str, state: tuple[Any, ...]) -> Any:
    return Reduce(np.dtype, (code, False, True), state)


def _array(shape: tuple[int, ...], dtype: Any, raw: Any) -> Any:
    return Reduce(_reconstruct(), (np.ndarray, (0,), b"b"), (1, shape, dtype, False, raw))


U4 = (3, "<", None, None, None, -1, -1, 0)
CORRUPT = {
    "short-bytes": lambda: _array((5,), np.dtype("u4"), b"\x00" * 4),
    "bad-shape": lambda: _array((-1,), np.dtype("u4"), b""),
    "not-a-dtype": lambda: _array((1,), "u4", b"\x00" * 4),
    "dtype-state": lambda: _dtype_state("u4", (3, "<", None, ("a",), None, -1, -1, 0)),
    "dtype-flags": lambda: _dtype_state("u4", (3, "<", None, None, None, -1, -1, 63)),
    "dtype-never-built": lambda: Reduce(np.dtype, ("u4", False, True)),
    "scalar-bytes": lambda: Reduce(np._core.multiarray.scalar, (np.dtype("f8"), b"\x00")),
    "path-parts": lambda: Reduce(pathlib.PosixPath, (1, 2)),
    "version": lambda: Reduce(TorchVersion, (5,)),
}


@pytest.mark.parametrize("kind", list(CORRUPT))
def test_values_that_numpy_never_writes_are_corrupt(kind: str, tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    torch.save({"ok": np.zeros(2), "x": CORRUPT[kind]()}, path)
    with pytest.raises(CorruptCheckpointError) as info:
        tk.load(path)
    assert str(path) in str(info.value)


@given(st.lists(VALUES, max_size=4))
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_any_harmless_value_loads_from_torch_save_and_round_trips(
    tmp_path: Path, values: list[Any]
) -> None:
    obj = {"values": values, "nested": [tuple(values)]}
    # A pickled path is cls(*parts), which CPython does not always round-trip
    # (PureWindowsPath("/a:") comes back as "a:"): a pickle-based file must give what pickle gives.
    pickled = [
        pickle.loads(pickle.dumps(v)) if isinstance(v, pathlib.PurePath) else v for v in values
    ]
    for path, write, want in (
        (tmp_path / "torch.pt", lambda p: torch.save(obj, p), pickled),
        (tmp_path / "ours.pt", lambda p: tk.save(obj, p), pickled),
        (tmp_path / "ours.safetensors", lambda p: tk.save(obj, p), values),
    ):
        write(path)
        out = tk.load(path)
        for expected, actual in zip(want, out["values"], strict=True):
            same_value(expected, actual)
        for expected, actual in zip(want, out["nested"][0], strict=True):
            same_value(expected, actual)


@pytest.mark.parametrize("kind", list(HAND_MADE))
def test_a_scan_calls_rebuilt_values_safe_as_load_does(kind: str, tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    torch.save(HAND_MADE[kind](), path)
    scan = tk.scan(path)
    assert scan.is_safe and scan.unsafe == ()  # tk.load reads it without trust: the scan agrees
    assert set(scan.rebuilt) <= SAFE_VALUE_GLOBALS
    assert all(g in scan.globals for g in scan.rebuilt)


@pytest.mark.parametrize("kind", ["os.system", "numpy.load", "rot13", "codecs-of-a-value"])
def test_a_scan_still_names_what_load_refuses(kind: str, tmp_path: Path) -> None:
    make, name = REFUSED[kind]
    path = tmp_path / "x.pt"
    torch.save({"rng": np.random.get_state(), "x": make()}, path)
    scan = tk.scan(path)
    assert not scan.is_safe and any(name in g for g in scan.unsafe), scan.unsafe
