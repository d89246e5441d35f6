"""capture_app / restore_app: a training app saved to a file and resumed bit for bit."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

import torchkeep
from torchkeep import IncompatibleStateError, RNGState, UnsupportedValueError
from torchkeep.state import capture_app, restore_app

FEATURES, CLASSES, SAMPLES, BATCH = 6, 3, 48, 8


@pytest.fixture(autouse=True)
def _quiet_process() -> Iterator[None]:
    """One thread (tiny tensors: more only wait on each other) and the RNGs left as found."""
    threads, python = torch.get_num_threads(), random.getstate()
    numpy_state, torch_state = np.random.get_state(), torch.get_rng_state()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    random.setstate(python)
    np.random.set_state(numpy_state)
    torch.set_rng_state(torch_state)


class Counter:
    """A user's own stateful object."""

    def __init__(self) -> None:
        self.seen = 0
        self.history: list[float] = []

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen, self.history = state["seen"], list(state["history"])


class Picky(Counter):
    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise ValueError("picky refuses")


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(SAMPLES, FEATURES, generator=g)
    return TensorDataset(x, torch.randint(0, CLASSES, (SAMPLES,), generator=g))


def make_model(hidden: int = 16) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(FEATURES, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(hidden, CLASSES),
    )


def make_app(seed: int, hidden: int = 16) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = make_model(hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    return {
        "model": model,
        "optimizer": optimizer,
        "scheduler": torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5),
        "scaler": torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2),
        "counter": Counter(),
        "noise": torch.Generator().manual_seed(seed + 1),
        "loader": DataLoader(
            dataset(),
            batch_size=BATCH,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed + 2),
        ),
        "rng": RNGState(),
        "epoch": 0,
        "config": {"lr": 1e-2, "layers": [FEATURES, hidden, CLASSES], "name": "mlp", "ema": None},
    }


def train_epoch(app: dict[str, Any]) -> list[float]:
    model, optimizer, scaler = app["model"], app["optimizer"], app["scaler"]
    model.train()
    losses = []
    for x, y in app["loader"]:
        x = x + 0.01 * torch.randn(x.shape, generator=app["noise"])
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        app["counter"].seen += len(y)
        app["counter"].history.append(loss.item())
        losses.append(loss.item())
    app["scheduler"].step()
    app["epoch"] += 1
    return losses


def snapshot(obj: Any) -> Any:
    """A deep copy of a state (tensors cloned), to compare with later."""
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(snapshot(v) for v in obj)
    return obj.clone() if isinstance(obj, torch.Tensor) else obj


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), where
    else:
        assert a == b and type(a) is type(b), where


def test_saved_app_resumes_bit_for_bit(tmp_path: Path) -> None:
    app = make_app(seed=0)
    train_epoch(app)
    path = tmp_path / "app.safetensors"
    torchkeep.save(capture_app(app), path)
    original = snapshot(capture_app(app))
    expected = [train_epoch(app), train_epoch(app)]  # the run goes on, uninterrupted

    fresh = make_app(seed=7)  # other weights, other generator states
    values = restore_app(fresh, torchkeep.load(path), source=str(path))
    assert values == {"epoch": 1, "config": original["config"]}
    assert fresh["epoch"] == 1 and fresh["config"] == original["config"]
    assert_same(original, snapshot(capture_app(fresh)))
    assert fresh["scaler"].get_scale() == original["scaler"]["scale"]
    assert fresh["scheduler"].get_last_lr() == original["scheduler"]["_last_lr"]

    # The resumed run repeats dropout masks, noise, data order and every update exactly.
    assert [train_epoch(fresh), train_epoch(fresh)] == expected
    assert_same(snapshot(capture_app(app)), snapshot(capture_app(fresh)))


def test_encoding_of_generators_and_loaders() -> None:
    app = make_app(seed=0)
    state = capture_app(app)
    assert set(state["noise"]) == {"__torchkeep__", "state"}
    assert state["noise"]["__torchkeep__"] == "generator"
    assert torch.equal(state["noise"]["state"], app["noise"].get_state())
    assert state["loader"]["__torchkeep__"] == "dataloader"
    assert torch.equal(state["loader"]["generator"], app["loader"].generator.get_state())
    assert "sampler_generator" not in state["loader"]  # the sampler shares the loader's
    assert state["epoch"] == 0 and state["config"] is app["config"]


def test_another_architecture_changes_nothing(tmp_path: Path) -> None:
    state = capture_app(make_app(seed=0))
    other = make_app(seed=3, hidden=20)
    train_epoch(other)  # the optimizer has state to lose
    before = snapshot(capture_app(other))
    with pytest.raises(IncompatibleStateError, match="'model'") as info:
        restore_app(other, state)
    assert info.value.report is not None and info.value.report.mismatched
    assert other["epoch"] == 1
    assert_same(before, snapshot(capture_app(other)))


def test_optimizer_with_other_param_groups(tmp_path: Path) -> None:
    state = capture_app(make_app(seed=0))
    other = make_app(seed=3)
    model = other["model"]
    other["optimizer"] = torch.optim.Adam(
        [{"params": model[0].parameters()}, {"params": list(model[1:].parameters())}], lr=1e-3
    )
    del other["scheduler"], state["scheduler"]
    before = snapshot(capture_app(other))
    with pytest.raises(IncompatibleStateError, match="'optimizer'.*sizes") as info:
        restore_app(other, state)
    assert info.value.key == "optimizer" and info.value.hint
    assert_same(before, snapshot(capture_app(other)))


def test_a_refused_state_is_wrapped_with_its_cause() -> None:
    state = capture_app(make_app(seed=0))
    other = make_app(seed=3)
    other["counter"] = Picky()
    weights = snapshot(other["model"].state_dict())
    with pytest.raises(IncompatibleStateError, match="'counter'.*Picky.*picky refuses") as info:
        restore_app(other, state)
    assert isinstance(info.value.__cause__, ValueError)
    assert_same(weights, snapshot(other["model"].state_dict()))  # models load after the others


def test_unsupported_objects_name_their_key() -> None:
    with pytest.raises(UnsupportedValueError, match="'thing'.*object") as info:
        capture_app({"epoch": 1, "thing": object()})
    assert info.value.key == "thing" and "state_dict()" in (info.value.hint or "")
    with pytest.raises(UnsupportedValueError, match=r"'config'.*obj\['path'\]"):
        capture_app({"config": {"path": range(3)}})  # (pathlib paths are stored since issue 11)


def test_shuffling_loader_without_generator_warns() -> None:
    loader = DataLoader(dataset(), batch_size=BATCH, shuffle=True)
    with pytest.warns(UserWarning, match="'train_loader'.*global.*NOT saved.*generator="):
        state = capture_app({"train_loader": loader})
    assert state["train_loader"]["generator"] is None
    with pytest.warns(UserWarning, match="'train_loader'.*saved by the app's RNGState"):
        capture_app({"train_loader": loader, "rng": RNGState()})
    capture_app({"eval": DataLoader(dataset(), batch_size=BATCH)})  # no shuffle: no warning


def test_loader_with_workers_warns() -> None:
    loader = DataLoader(dataset(), num_workers=2, generator=torch.Generator())
    with pytest.warns(UserWarning, match="'loader' has 2 worker.*worker_init_fn"):
        capture_app({"loader": loader})


def test_sampler_with_its_own_generator() -> None:
    def build(seed: int) -> DataLoader[Any]:
        sampler = RandomSampler(dataset(), generator=torch.Generator().manual_seed(seed))
        return DataLoader(dataset(), batch_size=BATCH, sampler=sampler)

    loader = build(0)
    list(loader)
    state = capture_app({"loader": loader})  # no warning: the order has its own generator
    expected = [y.tolist() for _, y in loader]
    fresh = build(5)
    restore_app({"loader": fresh}, state)
    assert [y.tolist() for _, y in fresh] == expected


def test_missing_and_extra_entries() -> None:
    state = capture_app({"epoch": 3, "best": 0.5})
    app: dict[str, Any] = {"epoch": 0, "counter": Counter()}
    with pytest.raises(IncompatibleStateError, match="no entry for 'counter'"):
        restore_app(app, state)
    assert app["epoch"] == 0
    with pytest.warns(UserWarning, match="absent from the checkpoint.*counter"):
        values = restore_app(app, state, strict=False)
    assert values == {"epoch": 3, "best": 0.5}
    assert app == {"epoch": 3, "counter": app["counter"]}  # "best" is returned, not added


def test_model_saved_from_a_ddp_wrapper() -> None:
    model = make_model()
    state = {"model": {f"module.{k}": v for k, v in model.state_dict().items()}}
    fresh = make_model()
    restore_app({"model": fresh}, state)
    assert_same(snapshot(model.state_dict()), snapshot(fresh.state_dict()))


def test_partial_model_load_warns_when_not_strict() -> None:
    model = make_model()
    saved = dict(model.state_dict())
    del saved["1.running_mean"]
    with pytest.raises(IncompatibleStateError, match="1 missing"):
        restore_app({"model": make_model()}, {"model": saved})
    fresh = make_model()
    with pytest.warns(UserWarning, match="(?s)'model' loaded partially.*1.running_mean  missing"):
        restore_app({"model": fresh}, {"model": saved}, strict=False)
    assert torch.equal(fresh.state_dict()["0.weight"], model.state_dict()["0.weight"])


def test_generator_entry_needs_generator_state() -> None:
    with pytest.raises(IncompatibleStateError, match="'noise'.*no generator state"):
        restore_app({"noise": torch.Generator()}, {"noise": 3})


def run_epochs(loader: DataLoader[Any], epochs: range, app: dict[str, Any]) -> list[list[int]]:
    """The mid-epoch recipe of torchkeep.state._app; returns each batch's labels."""
    g = loader.generator
    assert g is not None
    batches = []
    for epoch in epochs:
        done = app["batch"]
        if done:
            g.set_state(app["epoch_start"])
        else:
            app["epoch_start"] = g.get_state()
        for b, (_, y) in enumerate(itertools.islice(loader, done, None), start=done):
            batches.append(y.tolist())
            last = b == len(loader) - 1
            app["epoch"], app["batch"] = (epoch + 1, 0) if last else (epoch, b + 1)
            if app.get("stop") == (epoch, b):
                return batches
    return batches


def make_recipe_app(seed: int) -> dict[str, Any]:
    labels = torch.arange(SAMPLES)  # every sample its own label: batches show the order
    data = TensorDataset(torch.zeros(SAMPLES, 1), labels)
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=BATCH, shuffle=True, generator=g)
    return {"loader": loader, "epoch": 0, "batch": 0, "epoch_start": g.get_state()}


def test_mid_epoch_recipe_repeats_the_batch_order(tmp_path: Path) -> None:
    straight = make_recipe_app(seed=0)
    expected = run_epochs(straight["loader"], range(3), straight)

    first = make_recipe_app(seed=0)
    first["stop"] = (1, 2)  # interrupted in epoch 1, after its batch 2
    done = run_epochs(first["loader"], range(3), first)
    del first["stop"]
    path = tmp_path / "mid.safetensors"
    torchkeep.save(capture_app(first), path)

    resumed = make_recipe_app(seed=99)  # a new process: another generator state
    restore_app(resumed, torchkeep.load(path))
    assert (resumed["epoch"], resumed["batch"]) == (1, 3)
    rest = run_epochs(resumed["loader"], range(resumed["epoch"], 3), resumed)
    assert done + rest == expected

    # Without the epoch-start snapshot the saved generator (after the draw) gives another order.
    naive = make_recipe_app(seed=99)
    restore_app(naive, torchkeep.load(path))
    again = [y.tolist() for _, y in itertools.islice(naive["loader"], 3, None)]
    assert done + again != expected[: len(done) + len(again)]
