"""``torchkeep.testing``: comparing runs bit for bit, naming functions, reporting child failures.

The ``tiny_*`` functions below are module-level train functions that the subprocess tests run in
fresh interpreters (as ``tests.testing.test_resume:<name>``).
"""

from __future__ import annotations

import re
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import torchkeep as tk
from torchkeep.testing import ResumeReport, TrainProcessError, assert_resumes_exactly
from torchkeep.testing._child import _resolve
from torchkeep.testing._exact import _loss_divergence, _StateComparison, _tensor_difference
from torchkeep.testing._resume import _stop_points

ROOT = Path(__file__).resolve().parents[2]

# -- train functions run in child processes ------------------------------------------------------


def tiny_train(run_dir: str, stop_at: int | None) -> list[float]:
    """Deterministic and resumable: four steps, a checkpoint after each."""
    app: dict[str, Any] = {"w": torch.zeros(3), "step": -1, "note": "x"}
    losses = []
    with tk.CheckpointManager(run_dir) as mgr:
        mgr.restore(app)
        for step in range(app["step"] + 1, 4):
            app["w"] = app["w"] * 0.5 + torch.tensor([0.1, 0.2, 0.3]) * step
            losses.append(float(app["w"].sum()) / 3)
            app["step"] = step
            mgr.save(step, app)
            if step == stop_at:
                break
    return losses


def tiny_train_counting_restarts(run_dir: str, stop_at: int | None) -> list[float]:
    """Same losses as ``tiny_train``, but its checkpoint remembers how often it was restored."""
    app: dict[str, Any] = {"w": torch.zeros(3), "step": -1, "restarts": 0}
    losses = []
    with tk.CheckpointManager(run_dir) as mgr:
        if mgr.restore(app) is not None:
            app["restarts"] += 1
        for step in range(app["step"] + 1, 4):
            app["w"] = app["w"] * 0.5 + torch.tensor([0.1, 0.2, 0.3]) * step
            losses.append(float(app["w"].sum()) / 3)
            app["step"] = step
            mgr.save(step, app)
            if step == stop_at:
                break
    return losses


def tiny_train_ignoring_stop(run_dir: str, stop_at: int | None) -> list[float]:
    return tiny_train(run_dir, None)


def tiny_train_crashing(run_dir: str, stop_at: int | None) -> list[float]:
    print("about to fail on purpose", file=sys.stderr)
    raise RuntimeError("boom: the data file is missing")


def tiny_train_returning_none(run_dir: str, stop_at: int | None) -> None:
    return None


def tiny_train_sleeping(run_dir: str, stop_at: int | None) -> list[float]:
    time.sleep(60)
    return []


# -- losses ------------------------------------------------------------------------------------


def test_equal_losses_have_no_divergence() -> None:
    straight = [1.5, 0.25, float("nan"), 1e-30]
    assert _loss_divergence(straight, [[1.5, 0.25], [float("nan"), 1e-30]]) is None


def test_a_loss_that_differs_by_one_ulp_is_reported_with_its_invocation() -> None:
    straight = [1.0, 0.5, 0.25, 0.125]
    off = float.fromhex("0x1.0000000000001p-3")  # 0.125 plus one ulp
    message = _loss_divergence(straight, [[1.0, 0.5], [0.25, off]])
    assert message == (
        "losses first differ at index 3 (resumed invocation 2 of 2, its loss 1): "
        "straight run 0x1.0000000000000p-3 (0.125), "
        "resumed run 0x1.0000000000001p-3 (0.12500000000000003)"
    )


def test_only_the_first_divergence_is_reported() -> None:
    message = _loss_divergence([1.0, 2.0, 3.0], [[1.0], [2.5, 3.5]])
    assert message is not None
    assert "index 1 " in message and "3.5" not in message


def test_zero_and_negative_zero_differ() -> None:
    message = _loss_divergence([0.0], [[-0.0]])
    assert message is not None and "-0x0.0p+0 (-0.0)" in message


def test_missing_and_extra_losses_are_reported() -> None:
    short = _loss_divergence([1.0, 2.0, 3.0], [[1.0], [2.0]])
    assert short == (
        "the straight run logged 3 losses, the resumed run 2 (1 + 1); the first 2 agree, "
        "the straight run's loss 2 is 0x1.8000000000000p+1 (3.0)"
    )
    long = _loss_divergence([1.0], [[1.0], [4.0]])
    assert long is not None
    assert "the resumed run's loss 1 (resumed invocation 2 of 2, its loss 0) is" in long


# -- states ------------------------------------------------------------------------------------


def _state() -> dict[str, Any]:
    return {
        "model": {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(4)},
        "optimizer": {
            "state": {0: {"step": torch.tensor(7.0)}},
            "param_groups": [{"lr": 0.001, "betas": (0.9, 0.999), "params": [0]}],
        },
        "rng": {"python": {"state": list(range(625))}, "numpy": np.arange(5, dtype=np.uint32)},
        "epoch": 3,
        "name": "run",
    }


def _differences(a: Any, b: Any) -> list[tuple[str, str]]:
    comparison = _StateComparison()
    comparison.compare(a, b)
    return comparison.differences


def test_identical_states_are_counted() -> None:
    comparison = _StateComparison()
    comparison.compare(_state(), _state())
    assert comparison.differences == []
    assert comparison.summary() == []
    assert comparison.tensors == 4  # w, b, step and the NumPy array
    assert comparison.values == 1 + 2 + 1 + 625 + 1 + 1  # lr, betas, params, state, epoch, name


def test_one_tensor_element_gives_path_shape_diff_and_index() -> None:
    a, b = _state(), _state()
    b["model"]["w"][1, 2] += 0.5
    b["model"]["w"][2, 0] -= 2.0
    assert _differences(a, b) == [
        (
            "model.w",
            "float32 (3, 4): 2 of 12 elements differ, max abs diff 2, first at index (1, 2): "
            "0x1.8000000000000p+2 (6.0) vs 0x1.a000000000000p+2 (6.5)",
        )
    ]


def test_the_summary_leads_with_the_first_difference_and_lists_the_others() -> None:
    a, b = _state(), _state()
    b["model"]["b"][0] = 2.0
    b["optimizer"]["state"][0]["step"] += 1
    b["optimizer"]["param_groups"][0]["lr"] = 0.0005
    b["epoch"] = 4
    comparison = _StateComparison()
    comparison.compare(a, b)
    lines = comparison.summary()
    assert lines[0].startswith("the final checkpoints first differ at model.b: float32 (4,):")
    assert lines[1] == (
        "3 more entries differ: optimizer.state.0.step, optimizer.param_groups.0.lr, epoch"
    )


def test_dtype_shape_keys_and_types_are_reported() -> None:
    a, b = _state(), _state()
    b["model"]["w"] = b["model"]["w"].double()
    b["model"]["b"] = torch.ones(5)
    del b["name"]
    b["extra"] = 1
    b["epoch"] = 3.0
    # A structural difference of a dict is noted before its entries are walked.
    assert _differences(a, b) == [
        (
            "(the whole state)",
            "keys only in the straight run: ['name'], only in the resumed run: ['extra']",
        ),
        ("model.w", "dtype torch.float32 vs torch.float64"),
        ("model.b", "shape (4,) vs (5,)"),
        ("epoch", "int 3 vs float 3.0"),
    ]


def test_a_list_of_numbers_is_one_entry() -> None:
    a, b = _state(), _state()
    b["rng"]["python"]["state"][10] = -1
    b["rng"]["python"]["state"][20] = -1
    assert _differences(a, b) == [
        ("rng.python.state", "list of 625: 2 elements differ, first at index 10: 10 vs -1")
    ]
    b["rng"]["python"]["state"].pop()
    assert _differences(a, b)[0][1] == "list of length 625 vs 624 (the first 10 elements agree)"


def test_numpy_arrays_are_compared_by_bytes() -> None:
    a, b = _state(), _state()
    b["rng"]["numpy"][3] = 99
    assert _differences(a, b) == [
        (
            "rng.numpy",
            "numpy uint32 (5,): 1 of 5 elements differ, max abs diff 96, first at index (3,): "
            "3 vs 99",
        )
    ]


def test_tensors_are_compared_bit_for_bit() -> None:
    nan = torch.tensor([float("nan"), 1.0])
    assert _tensor_difference(nan, nan.clone()) is None  # the same NaN is no difference
    message = _tensor_difference(torch.zeros(2), torch.tensor([0.0, -0.0]))
    assert (
        message is not None
        and "1 of 2 elements differ, max abs diff 0, first at index (1,)" in (message)
    )
    assert _tensor_difference(torch.tensor(1.5), torch.tensor(1.5)) is None
    scalar = _tensor_difference(torch.tensor(1.5), torch.tensor(2.5))
    assert scalar is not None and "first at index (): 0x1.8" in scalar
    flags = _tensor_difference(torch.tensor([True, False]), torch.tensor([True, True]))
    assert (
        flags
        == "bool (2,): 1 of 2 elements differ, max abs diff n/a, first at index (1,): False vs True"
    )
    halves = _tensor_difference(
        torch.ones(3, dtype=torch.bfloat16), torch.zeros(3, dtype=torch.bfloat16)
    )
    assert halves is not None and halves.startswith(
        "bfloat16 (3,): 3 of 3 elements differ, max abs diff 1,"
    )
    wide = torch.arange(6.0).reshape(2, 3)
    assert _tensor_difference(wide.t(), wide.t().contiguous()) is None  # layout is not content
    assert _tensor_difference(torch.empty(0, 3), torch.empty(0, 3)) is None


# -- naming train_fn --------------------------------------------------------------------------


def test_a_function_and_its_string_name_resolve_alike() -> None:
    assert _resolve(tiny_train) == ("tests.testing.test_resume:tiny_train", ROOT)
    assert _resolve("tests.testing.test_resume:tiny_train") == (
        "tests.testing.test_resume:tiny_train",
        ROOT,
    )
    assert _resolve("torchkeep.testing:assert_resumes_exactly")[0] == (
        "torchkeep.testing:assert_resumes_exactly"
    )


def test_functions_a_fresh_process_cannot_import_are_refused() -> None:
    def local(run_dir: str, stop_at: int | None) -> list[float]:
        return []

    with pytest.raises(tk.InvalidArgumentError, match="not a module-level function"):
        _resolve(local)
    with pytest.raises(tk.InvalidArgumentError, match="not a module-level function"):
        _resolve(lambda run_dir, stop_at: [])
    in_main = types.FunctionType(tiny_train.__code__, {}, "tiny_train")
    in_main.__module__ = "__main__"
    with pytest.raises(tk.InvalidArgumentError, match="defined in __main__"):
        _resolve(in_main)
    copy = types.FunctionType(tiny_train.__code__, globals(), "tiny_train")
    copy.__module__, copy.__qualname__ = __name__, "tiny_train"
    with pytest.raises(tk.InvalidArgumentError, match="does not name the train_fn given"):
        _resolve(copy)
    with pytest.raises(tk.InvalidArgumentError, match="must be written 'package.module:function'"):
        _resolve("tests.testing.test_resume.tiny_train")
    with pytest.raises(
        tk.InvalidArgumentError, match="cannot import train_fn's module 'tests.nowhere'"
    ):
        _resolve("tests.nowhere:train")
    with pytest.raises(tk.InvalidArgumentError, match="has no 'missing'"):
        _resolve("tests.testing.test_resume:missing")
    with pytest.raises(tk.InvalidArgumentError, match="is not callable"):
        _resolve("tests.testing.test_resume:ROOT")


def test_stop_points_are_checked() -> None:
    assert _stop_points(3) == (3,)
    assert _stop_points([1, 4, 9]) == (1, 4, 9)
    for bad in ([], -1, [2, 2], [3, 1], True, [1.5]):
        with pytest.raises(tk.InvalidArgumentError):
            _stop_points(bad)  # type: ignore[arg-type]


def test_a_used_workdir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "straight").mkdir()
    (tmp_path / "straight" / "old.txt").write_text("x")
    with pytest.raises(tk.InvalidArgumentError, match="already exists and is not empty") as info:
        assert_resumes_exactly(tiny_train, stop_at=1, workdir=tmp_path)
    assert isinstance(info.value, ValueError)  # what it raised before


# -- whole runs in child processes ------------------------------------------------------------


def test_an_exact_resume_passes_by_string_name(tmp_path: Path) -> None:
    report = assert_resumes_exactly(
        "tests.testing.test_resume:tiny_train", stop_at=[0, 2], workdir=tmp_path
    )
    assert isinstance(report, ResumeReport)
    assert report.train_fn == "tests.testing.test_resume:tiny_train"
    assert (report.stop_at, report.resumed_losses, report.steps_compared) == ((0, 2), (1, 2, 1), 4)
    assert (report.tensors_compared, report.values_compared, report.final_step) == (1, 2, 3)
    assert (report.straight_dir, report.resumed_dir) == (
        tmp_path / "straight",
        tmp_path / "resumed",
    )
    assert report.straight_seconds > 0 and len(report.resumed_seconds) == 3
    with pytest.raises(AttributeError):
        report.steps_compared = 0  # type: ignore[misc]


def test_a_state_only_divergence_is_caught(tmp_path: Path) -> None:
    with pytest.raises(AssertionError) as caught:
        assert_resumes_exactly(tiny_train_counting_restarts, stop_at=1, workdir=tmp_path)
    message = str(caught.value)
    assert "losses" not in message  # they agree
    assert "the final checkpoints first differ at restarts: 0 vs 1" in message
    assert f"run directories: {tmp_path / 'straight'} (straight)" in message


def test_a_train_fn_that_does_not_stop_is_caught(tmp_path: Path) -> None:
    with pytest.raises(
        AssertionError,
        match=re.escape(
            "train_fn(run_dir, stop_at=1) must return right after committing the checkpoint at "
            "step 1, but the run's latest checkpoint is step 3: it did not stop at step 1"
        ),
    ):
        assert_resumes_exactly(tiny_train_ignoring_stop, stop_at=1, workdir=tmp_path)


def test_a_crash_reports_the_childs_stderr(tmp_path: Path) -> None:
    with pytest.raises(TrainProcessError) as caught:
        assert_resumes_exactly(tiny_train_crashing, stop_at=1, workdir=tmp_path, parallel=False)
    message = str(caught.value)
    assert message.startswith("the straight run: tests.testing.test_resume:tiny_train_crashing(")
    assert "stop_at=None) failed (exit status 1)" in message
    assert "about to fail on purpose" in message
    assert "RuntimeError: boom: the data file is missing" in message
    assert isinstance(caught.value, AssertionError)


def test_a_train_fn_must_return_its_losses(tmp_path: Path) -> None:
    with pytest.raises(
        TrainProcessError, match=r"must return the list of losses it logged, not None"
    ):
        assert_resumes_exactly(
            tiny_train_returning_none,  # type: ignore[arg-type]
            stop_at=1,
            workdir=tmp_path,
            parallel=False,
        )


def test_a_hung_train_fn_is_killed(tmp_path: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(TrainProcessError, match=r"did not finish within 3 s and was killed"):
        assert_resumes_exactly(
            tiny_train_sleeping, stop_at=1, workdir=tmp_path, timeout=3, parallel=False
        )
    assert time.perf_counter() - start < 30
