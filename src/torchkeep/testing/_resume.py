"""``assert_resumes_exactly``: run a training function straight and interrupted, compare both.

The straight run and the chain of resumed invocations each run in fresh processes
(:mod:`torchkeep.testing._child`); the losses and the final checkpoints are compared bit for
bit (:mod:`torchkeep.testing._exact`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torchkeep.errors import InvalidArgumentError, StorageError
from torchkeep.format import RunReader, is_run
from torchkeep.io import load
from torchkeep.storage import storage_for
from torchkeep.testing._child import TrainFn, _child_env, _Invocation, _invoke, _resolve
from torchkeep.testing._exact import _loss_divergence, _StateComparison


@dataclass(frozen=True, kw_only=True, slots=True)
class ResumeReport:
    """What ``assert_resumes_exactly`` compared, once everything matched.

    Attributes:
        train_fn: the function run, as ``"module:qualname"``.
        stop_at: the steps the resumed run was stopped at, in order.
        steps_compared: the number of logged losses compared (each bit for bit).
        tensors_compared: the tensors of the final checkpoints compared (0 without
            ``compare_state``).
        values_compared: the plain values (numbers, strings...) of the final checkpoints compared.
        final_step: the step of both runs' latest checkpoint (``None`` without ``compare_state``).
        straight_dir: the run directory of the uninterrupted run.
        resumed_dir: the run directory of the interrupted and resumed run. Both directories are
            deleted on success when no ``workdir`` was given.
        straight_seconds: wall time of the uninterrupted process.
        resumed_seconds: wall time of each process of the resumed run, in order.
        resumed_losses: how many losses each process of the resumed run logged, in order.
    """

    train_fn: str
    stop_at: tuple[int, ...]
    steps_compared: int
    tensors_compared: int
    values_compared: int
    final_step: int | None
    straight_dir: Path
    resumed_dir: Path
    straight_seconds: float
    resumed_seconds: tuple[float, ...]
    resumed_losses: tuple[int, ...]


def assert_resumes_exactly(
    train_fn: TrainFn | str,
    *,
    stop_at: int | Sequence[int],
    workdir: str | os.PathLike[str] | None = None,
    timeout: float = 600.0,
    compare_state: bool = True,
    parallel: bool = True,
) -> ResumeReport:
    """Check that stopping a training run at a checkpoint and resuming it changes nothing.

    Every call of ``train_fn`` runs in a fresh ``sys.executable`` process, as a real restart
    would: nothing survives in memory between the interrupted and the resumed part.

    1. Straight run: ``train_fn(dir_a, None)``.
    2. Resumed run: ``train_fn(dir_b, s)`` for each stop point ``s``, then ``train_fn(dir_b, None)``.

    Then the losses of the resumed run's invocations, concatenated, must equal the straight run's
    bit for bit, and (``compare_state``) both runs' latest checkpoints, loaded with
    ``torchkeep.load(f"{dir}@latest")``, must hold the same entries: every tensor with the same
    dtype, shape and bytes, every plain value equal (floats bit for bit).

    ``train_fn(run_dir, stop_at) -> list[float]`` must be a module-level function that a fresh
    process can import (its module's root directory is put on the child's ``PYTHONPATH``). It
    trains with a ``CheckpointManager(run_dir)``, restoring first when there is a checkpoint;
    when ``stop_at`` is not ``None`` it returns right after the checkpoint at step ``stop_at`` is
    committed. It returns the losses it logged in this invocation only, in order. It must be
    deterministic: seed every generator (``random``, ``numpy`` and ``torch``, also those the loop
    never draws from: ``RNGState`` saves them all, and unseeded ones start differently in every
    process), call ``torch.set_num_threads(1)`` or use deterministic kernels, and keep wall-clock
    times out of the checkpoint.

    Args:
        train_fn: the function, or ``"package.module:function"``.
        stop_at: the step to interrupt the resumed run at, or several (increasing) for several
            interruptions.
        workdir: where to create the two run directories (``straight/`` and ``resumed/``, which
            must not hold anything yet); kept afterwards. By default a temporary directory,
            deleted on success and kept (named in the error) on failure.
        timeout: seconds each process may take.
        compare_state: also compare the final checkpoints, not only the losses.
        parallel: run the straight run at the same time as the resumed one (two processes).

    Returns:
        A ``ResumeReport`` of what was compared and how long each process took.

    Raises:
        AssertionError: the runs differ; the message names the first divergence: the loss index
            (and which invocation logged it) with both values in hex and decimal, then the first
            differing checkpoint entry by dotted path (shapes, max abs diff, first differing
            index). Also when an interrupted invocation did not stop at its checkpoint.
        TrainProcessError: (an ``AssertionError``) a process failed; holds its stderr's end.
        InvalidArgumentError: (a ``ValueError``) ``train_fn`` is not importable by name, a bad
            ``stop_at``, or a ``workdir`` already in use.

    Example:
        A ``train_fn`` that resumes exactly (in ``mypkg/train.py``, a module a fresh process can
        import)::

            import random

            import numpy as np
            import torch
            import torchkeep as tk

            def train(run_dir: str, stop_at: int | None) -> list[float]:
                torch.set_num_threads(1)
                random.seed(0), np.random.seed(0), torch.manual_seed(0)
                model = torch.nn.Sequential(
                    torch.nn.Linear(8, 16), torch.nn.Dropout(0.1), torch.nn.Linear(16, 1)
                )
                opt = torch.optim.Adam(model.parameters(), lr=1e-2)
                sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
                data = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
                loader = torch.utils.data.DataLoader(
                    data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(2)
                )
                app = {"model": model, "optimizer": opt, "scheduler": sched,
                       "rng": tk.RNGState(), "loader": loader, "epoch": -1}
                losses = []
                with tk.CheckpointManager(run_dir) as mgr:
                    mgr.restore(app)                    # None (nothing loaded) on a fresh run
                    for epoch in range(app["epoch"] + 1, 5):   # the step is the epoch
                        for x in loader:
                            loss = model(x).pow(2).mean()
                            opt.zero_grad()
                            loss.backward()
                            opt.step()
                            losses.append(loss.item())
                        sched.step()
                        app["epoch"] = epoch
                        mgr.save(epoch, app)
                        if epoch == stop_at:
                            break
                return losses

        and its test::

            from torchkeep.testing import assert_resumes_exactly

            def test_resume(tmp_path):
                report = assert_resumes_exactly("mypkg.train:train", stop_at=2, workdir=tmp_path)
                assert report.steps_compared == 20
    """
    spec, root = _resolve(train_fn)
    stops = _stop_points(stop_at)
    if timeout <= 0:
        raise InvalidArgumentError(f"timeout must be positive, not {timeout!r}")
    owned = workdir is None
    base = Path(tempfile.mkdtemp(prefix="torchkeep-resume-") if workdir is None else workdir)
    straight_dir, resumed_dir = base / "straight", base / "resumed"
    for folder in (straight_dir, resumed_dir):
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise InvalidArgumentError(
                f"{folder} already exists and is not empty: give a fresh workdir"
            )
        folder.mkdir(parents=True, exist_ok=True)
    env = _child_env(root)
    kept = f"run directories: {straight_dir} (straight), {resumed_dir} (resumed)"
    try:
        straight, resumed = _run_both(
            spec, env, straight_dir, resumed_dir, stops, timeout=timeout, parallel=parallel
        )
        report = _compare(
            spec, stops, straight, resumed, straight_dir, resumed_dir, compare_state=compare_state
        )
    except AssertionError as exc:
        raise type(exc)(f"{exc}\n{kept}") from None
    if owned:
        with contextlib.suppress(StorageError):  # a scratch folder: best effort
            storage_for(base).remove_tree(str(base))
    return report


# -- running the processes ------------------------------------------------------------------------


def _run_both(
    spec: str,
    env: dict[str, str],
    straight_dir: Path,
    resumed_dir: Path,
    stops: tuple[int, ...],
    *,
    timeout: float,
    parallel: bool,
) -> tuple[_Invocation, list[_Invocation]]:
    """Run the straight process (in a thread when ``parallel``) and the resumed chain."""
    outcome: list[_Invocation] = []
    failure: list[BaseException] = []

    def straight() -> None:
        try:
            outcome.append(
                _invoke(spec, env, straight_dir, None, timeout=timeout, label="the straight run")
            )
        except BaseException as exc:  # handed to the main thread
            failure.append(exc)

    thread = threading.Thread(target=straight, name="torchkeep-straight-run", daemon=True)
    if parallel:
        thread.start()
    else:
        straight()
        if failure:
            raise failure[0]
    resumed: list[_Invocation] = []
    try:
        for i, stop in enumerate((*stops, None)):
            label = f"the resumed run, invocation {i + 1} of {len(stops) + 1}"
            resumed.append(_invoke(spec, env, resumed_dir, stop, timeout=timeout, label=label))
            if stop is not None:
                _check_stopped(resumed_dir, stop, label)
    finally:
        if parallel:
            thread.join()
    if failure:
        raise failure[0]
    return outcome[0], resumed


def _check_stopped(run_dir: Path, stop: int, label: str) -> None:
    steps = RunReader(run_dir).steps() if is_run(run_dir) else []
    if not steps or steps[-1] != stop:
        found = f"step {steps[-1]}" if steps else "none"
        raise AssertionError(
            f"{label}: train_fn(run_dir, stop_at={stop}) must return right after committing the "
            f"checkpoint at step {stop}, but the run's latest checkpoint is {found}: it "
            f"{'never reached' if not steps or steps[-1] < stop else 'did not stop at'} step "
            f"{stop} (is step {stop} one it checkpoints at?)"
        )


def _stop_points(stop_at: int | Sequence[int]) -> tuple[int, ...]:
    stops = (stop_at,) if isinstance(stop_at, int) else tuple(stop_at)
    if not stops or not all(type(s) is int and s >= 0 for s in stops):
        raise InvalidArgumentError(
            f"stop_at must be a step (an int >= 0) or a list of them, not {stop_at!r}"
        )
    if any(b <= a for a, b in zip(stops, stops[1:], strict=False)):
        raise InvalidArgumentError(f"the stop points must increase, not {list(stops)}")
    return stops


# -- comparing -----------------------------------------------------------------------------------


def _compare(
    spec: str,
    stops: tuple[int, ...],
    straight: _Invocation,
    resumed: list[_Invocation],
    straight_dir: Path,
    resumed_dir: Path,
    *,
    compare_state: bool,
) -> ResumeReport:
    steps_a = RunReader(straight_dir).steps() if is_run(straight_dir) else []
    steps_b = RunReader(resumed_dir).steps() if is_run(resumed_dir) else []
    if not steps_a:
        raise AssertionError("the straight run committed no checkpoint: nothing was resumed")
    if steps_a[-1] <= stops[-1]:
        raise InvalidArgumentError(
            f"the straight run ends at step {steps_a[-1]}, not after the last stop point "
            f"{stops[-1]}: nothing would be resumed"
        )
    problems: list[str] = []
    loss_problem = _loss_divergence(straight.losses, [r.losses for r in resumed])
    if loss_problem is not None:
        problems.append(loss_problem)
    comparison = _StateComparison()
    final_step: int | None = None
    if compare_state:
        if not steps_b or steps_b[-1] != steps_a[-1]:
            problems.append(
                f"the final checkpoints are at different steps: straight run {steps_a[-1]}, "
                f"resumed run {steps_b[-1] if steps_b else None}"
            )
        else:
            final_step = steps_a[-1]
            comparison.compare(load(f"{straight_dir}@latest"), load(f"{resumed_dir}@latest"))
            problems.extend(comparison.summary())
    if problems:
        raise AssertionError(
            f"{spec} does not resume exactly (stopped at {', '.join(map(str, stops))}, then "
            "resumed in new processes):\n  " + "\n  ".join(problems)
        )
    return ResumeReport(
        train_fn=spec,
        stop_at=stops,
        steps_compared=len(straight.losses),
        tensors_compared=comparison.tensors,
        values_compared=comparison.values,
        final_step=final_step,
        straight_dir=straight_dir,
        resumed_dir=resumed_dir,
        straight_seconds=straight.seconds,
        resumed_seconds=tuple(r.seconds for r in resumed),
        resumed_losses=tuple(len(r.losses) for r in resumed),
    )
