"""Test helpers for training code: prove that a training script resumes exactly.

``assert_resumes_exactly(train_fn, stop_at=...)`` runs ``train_fn`` straight through in a fresh
process, and again interrupted at a checkpoint and resumed in new processes, then checks that
both runs logged bit-identical losses and ended with bit-identical checkpoints. A resume that
forgets the RNG, the LR scheduler, the DataLoader order or the position inside an epoch shows up
as the first loss (or tensor element) that differs.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchkeep.format import RunReader, is_run
from torchkeep.io import load
from torchkeep.testing._exact import _loss_divergence, _StateComparison

__all__ = ["ResumeReport", "TrainProcessError", "assert_resumes_exactly"]

TrainFn = Callable[[str, int | None], Sequence[float]]

_CHILD = "from torchkeep.testing import _child_main; _child_main()"
_TAIL_CHARS = 4000


class TrainProcessError(AssertionError):
    """A ``train_fn`` process failed (raised, crashed, timed out, returned no list of losses).

    The message holds the end of the child's stderr (its traceback).
    """


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


@dataclass(frozen=True, slots=True)
class _Invocation:
    stop_at: int | None
    losses: list[float]
    seconds: float


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
        ValueError: ``train_fn`` is not importable by name, a bad ``stop_at``, or a ``workdir``
            already in use.

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
        raise ValueError(f"timeout must be positive, not {timeout!r}")
    owned = workdir is None
    base = Path(tempfile.mkdtemp(prefix="torchkeep-resume-") if workdir is None else workdir)
    straight_dir, resumed_dir = base / "straight", base / "resumed"
    for folder in (straight_dir, resumed_dir):
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise ValueError(f"{folder} already exists and is not empty: give a fresh workdir")
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
        shutil.rmtree(base, ignore_errors=True)
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


def _invoke(
    spec: str, env: dict[str, str], run_dir: Path, stop: int | None, *, timeout: float, label: str
) -> _Invocation:
    """Run ``train_fn(run_dir, stop)`` in a fresh interpreter and read back its losses."""
    call = f"{spec}({str(run_dir)!r}, stop_at={stop})"
    with tempfile.TemporaryDirectory(prefix="torchkeep-child-") as tmp:
        result = Path(tmp) / "losses.json"
        command = [
            sys.executable,
            "-c",
            _CHILD,
            spec,
            str(run_dir),
            "none" if stop is None else str(stop),
            str(result),
        ]
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise TrainProcessError(
                f"{label}: {call} did not finish within {timeout:g} s and was killed\n"
                f"{_tail(exc.stderr)}"
            ) from None
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            status = (
                f"killed by signal {-proc.returncode}"
                if proc.returncode < 0
                else f"exit status {proc.returncode}"
            )
            raise TrainProcessError(f"{label}: {call} failed ({status})\n{_tail(proc.stderr)}")
        try:
            document = json.loads(result.read_text(encoding="utf-8"))
            losses = [float.fromhex(h) for h in document["losses"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise TrainProcessError(
                f"{label}: {call} exited without reporting its losses ({exc})\n{_tail(proc.stderr)}"
            ) from None
    return _Invocation(stop_at=stop, losses=losses, seconds=seconds)


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


def _tail(text: str | bytes | None) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    text = (text or "").rstrip()
    if not text:
        return "(its stderr is empty)"
    if len(text) > _TAIL_CHARS:
        text = "..." + text[-_TAIL_CHARS:]
    return "the end of its stderr:\n" + text


def _child_env(root: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    if root is not None:
        paths = [str(root), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def _child_main() -> None:
    """Entry point of a child process: ``SPEC RUN_DIR STOP|none RESULT_FILE``."""
    spec, run_dir, stop_text, result_path = sys.argv[1:5]
    module_name, _, qualname = spec.partition(":")
    train_fn = _import_target(module_name, qualname)
    stop = None if stop_text == "none" else int(stop_text)
    losses = train_fn(run_dir, stop)
    document = {"losses": [x.hex() for x in _as_floats(losses, spec)]}
    Path(result_path).write_text(json.dumps(document), encoding="utf-8")


def _as_floats(losses: Any, spec: str) -> list[float]:
    if isinstance(losses, str | bytes | Mapping) or not isinstance(losses, Sequence):
        raise TypeError(f"{spec} must return the list of losses it logged, not {losses!r:.200}")
    out = []
    for i, value in enumerate(losses):
        if isinstance(value, str | bytes | bool):
            raise TypeError(f"{spec} returned a non-number loss at index {i}: {value!r:.100}")
        try:
            out.append(float(value))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(
                f"{spec} returned a loss at index {i} that is not a number: {value!r:.100}"
            ) from exc
    return out


# -- naming the function ----------------------------------------------------------------------


def _resolve(train_fn: TrainFn | str) -> tuple[str, Path | None]:
    """``"module:qualname"`` for ``train_fn``, and the directory a child needs on its path."""
    if isinstance(train_fn, str):
        module_name, sep, qualname = train_fn.partition(":")
        if not sep or not module_name or not qualname:
            raise ValueError(f"train_fn {train_fn!r} must be written 'package.module:function'")
        _import_target(module_name, qualname)
    else:
        if not callable(train_fn):
            raise TypeError("train_fn must be a function or a 'module:function' string")
        module_name = getattr(train_fn, "__module__", None) or ""
        qualname = getattr(train_fn, "__qualname__", None) or ""
        if not module_name or not qualname or "<" in qualname:
            raise ValueError(
                f"train_fn {train_fn!r} is not a module-level function: a fresh process cannot "
                "import it (define it at the top level of a module)"
            )
        if module_name == "__main__":
            raise ValueError(
                f"train_fn {qualname} is defined in __main__, which a fresh process cannot "
                "import: move it into a module, or pass 'package.module:function'"
            )
        if _import_target(module_name, qualname) is not train_fn:
            raise ValueError(
                f"{module_name}:{qualname} does not name the train_fn given (redefined or "
                "decorated without functools.wraps?)"
            )
    return f"{module_name}:{qualname}", _import_root(module_name)


def _import_target(module_name: str, qualname: str) -> Any:
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import train_fn's module {module_name!r}: {exc}") from exc
    for part in qualname.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ValueError(f"module {module_name!r} has no {qualname!r}") from None
    if not callable(target):
        raise ValueError(f"{module_name}:{qualname} is not callable")
    return target


def _import_root(module_name: str) -> Path | None:
    """The directory from which ``import module_name`` finds the module, when it is a file."""
    module = sys.modules.get(module_name)
    file = getattr(module, "__file__", None)
    if not file:
        return None
    path = Path(file).absolute()
    depth = module_name.count(".") + (1 if path.stem == "__init__" else 0)
    root = path.parent
    for _ in range(depth):
        root = root.parent
    return root


def _stop_points(stop_at: int | Sequence[int]) -> tuple[int, ...]:
    stops = (stop_at,) if isinstance(stop_at, int) else tuple(stop_at)
    if not stops or not all(type(s) is int and s >= 0 for s in stops):
        raise ValueError(f"stop_at must be a step (an int >= 0) or a list of them, not {stop_at!r}")
    if any(b <= a for a, b in zip(stops, stops[1:], strict=False)):
        raise ValueError(f"the stop points must increase, not {list(stops)}")
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
        raise ValueError(
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
