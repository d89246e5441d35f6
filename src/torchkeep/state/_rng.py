"""`RNGState`: the random number generators a training run draws from, as one stateful object.

Exact resume needs every generator the loop touches: Python's ``random`` (augmentations),
NumPy's global generator, torch's CPU generator (dropout, init, samplers without a generator of
their own) and each CUDA device's generator. Put an ``RNGState()`` in the app and the manager
saves and restores them with everything else.

The saved state holds only storable values (tensors, numbers, strings, None, dicts)::

    {"python": {"version": 3, "state": uint32 tensor (625,), "gauss": float | None},
     "numpy": np.random.get_state(legacy=False), arrays as tensors of the same dtype,
     "torch": uint8 tensor (torch.get_rng_state()),
     "cuda": [uint8 tensor per device]}          # only when CUDA is initialized

CUDA is captured only when this process has already initialized it. Reading a device's
generator initializes CUDA, which creates a context on every visible device (hundreds of MB
each, and in a multi-process job every rank would touch every GPU). A process that has not
initialized CUDA has drawn nothing from those generators: their first state is fixed by the
seeds the script sets (``torch.manual_seed`` queues them until CUDA starts), which a resumed
script sets again. Restoring never initializes CUDA either: torch queues the states until then.

Restoring is all or nothing for Python, NumPy and torch: the saved state is checked and set,
and the previous states are put back if any part is refused. What cannot be restored (a
checkpoint from 2 GPUs on a machine with 1, a source absent from the checkpoint) is named in a
``UserWarning``: the run goes on, but those numbers will not repeat.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from numpy.random.mtrand import get_bit_generator, set_bit_generator

from torchkeep.errors import IncompatibleStateError

SOURCES = ("python", "numpy", "torch", "cuda")
# The bit generators NumPy's global generator may be switched to (np.random.set_bit_generator):
# a closed set, so a checkpoint can name one but never make us construct anything else.
_NUMPY_BIT_GENERATORS = frozenset({"MT19937", "PCG64", "PCG64DXSM", "Philox", "SFC64"})

Setter = Callable[[], None]


class RNGState:
    """Captures and restores Python, NumPy, torch CPU and CUDA random generators.

    Args:
        python: include Python's ``random`` module.
        numpy: include NumPy's global generator (``np.random``).
        torch: include torch's CPU generator.
        cuda: include every CUDA device's generator (when this process has initialized CUDA).

    Example:
        >>> app = {"model": model, "optimizer": opt, "rng": torchkeep.RNGState(), "epoch": 0}
    """

    def __init__(
        self, *, python: bool = True, numpy: bool = True, torch: bool = True, cuda: bool = True
    ) -> None:
        self.python, self.numpy, self.torch, self.cuda = python, numpy, torch, cuda

    @property
    def sources(self) -> tuple[str, ...]:
        """The generators this object saves and restores, by name."""
        flags = (self.python, self.numpy, self.torch, self.cuda)
        return tuple(name for name, on in zip(SOURCES, flags, strict=True) if on)

    def __repr__(self) -> str:
        flags = ", ".join(f"{name}={name in self.sources}" for name in SOURCES)
        return f"RNGState({flags})"

    def state_dict(self) -> dict[str, Any]:
        """The current state of every included generator (storable values only)."""
        state: dict[str, Any] = {}
        if self.python:
            version, internal, gauss = random.getstate()
            state["python"] = {
                "version": version,
                "state": torch.from_numpy(np.asarray(internal, dtype=np.uint32)),
                "gauss": gauss,
            }
        if self.numpy:
            state["numpy"] = _tensors_of(np.random.get_state(legacy=False))
        if self.torch:
            state["torch"] = torch.get_rng_state()
        if self.cuda and _cuda_initialized():
            state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Set every included generator back to ``state``.

        Raises:
            IncompatibleStateError: ``state`` is malformed; no generator was changed.
        """
        if not isinstance(state, Mapping):
            raise _malformed("state", TypeError(f"a {type(state).__name__}, not a dict"))
        setters: list[tuple[str, Setter, Setter | None]] = []
        lost: list[str] = []
        decoders = {"python": _python_setter, "numpy": _numpy_setter, "torch": _torch_setter}
        for name in self.sources:
            if name == "cuda":
                continue
            if name not in state:
                lost.append(f"{name} (absent from the checkpoint)")
                continue
            try:
                setters.append((name, decoders[name](state[name]), _undo(name)))
            except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
                raise _malformed(name, exc) from exc
        if self.cuda and state.get("cuda") is not None:
            setters += _cuda_setters(state["cuda"], lost)
        lost += [f"{k!r} (unknown to RNGState)" for k in state if k not in SOURCES]
        done: list[Setter | None] = []
        for name, setter, undo in setters:
            done.append(undo)  # first: a setter that fails may have changed its generator
            try:
                setter()
            except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
                for previous in reversed(done):
                    if previous is not None:
                        previous()
                raise _malformed(name, exc) from exc
        if lost:
            warnings.warn(
                f"RNGState: not restored: {'; '.join(lost)}. Random numbers from those "
                "generators will not repeat the original run's",
                UserWarning,
                stacklevel=2,
            )


def _cuda_initialized() -> bool:
    initialized = bool(torch.cuda.is_initialized())  # type: ignore[no-untyped-call]  # torch.cuda.is_initialized is unannotated
    return initialized and torch.cuda.is_available()


def _malformed(name: str, exc: BaseException) -> IncompatibleStateError:
    return IncompatibleStateError(
        f"the saved {name!r} random generator state is malformed: {exc}",
        key=name,
        expected="a state saved by torchkeep.RNGState",
        hint="the checkpoint was damaged or this entry was not saved by RNGState",
    )


def _tensors_of(value: Any) -> Any:
    """NumPy's state dict with its arrays as tensors of the same dtype (storable everywhere)."""
    if isinstance(value, dict):
        return {k: _tensors_of(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, np.generic):
        return value.item()
    return value


def _arrays_of(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _arrays_of(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return value


def _byte_tensor(value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
        raise TypeError(f"expected a 1-D uint8 tensor, found {value!r:.80}")
    return value.detach().cpu().clone()


def _python_setter(saved: Any) -> Setter:
    internal = saved["state"]
    if isinstance(internal, torch.Tensor):
        internal = internal.cpu().numpy()
    words = tuple(int(x) for x in np.asarray(internal).tolist())
    gauss = saved["gauss"]
    value = (int(saved["version"]), words, None if gauss is None else float(gauss))
    return lambda: random.setstate(value)


def _numpy_setter(saved: Any) -> Setter:
    if "state" not in saved and "key" in saved:  # the layout of torchkeep 0.1's first commit
        saved = {**saved, "state": {"key": saved["key"], "pos": saved["pos"]}}
    value = _arrays_of(saved)
    name = value["bit_generator"]
    if not isinstance(name, str) or not isinstance(value["state"], dict):
        raise TypeError("expected np.random.get_state(legacy=False)'s layout")
    if name not in _NUMPY_BIT_GENERATORS:
        raise ValueError(f"unknown NumPy bit generator {name!r}")

    def restore() -> None:
        if type(get_bit_generator()).__name__ != name:
            set_bit_generator(getattr(np.random, name)())
        np.random.set_state(value)

    return restore


def _torch_setter(saved: Any) -> Setter:
    value = _byte_tensor(saved)
    return lambda: torch.set_rng_state(value)


def _undo(name: str) -> Setter:
    """A setter that puts the current state of ``name`` back."""
    if name == "python":
        python_state = random.getstate()
        return lambda: random.setstate(python_state)
    if name == "numpy":
        bit_generator = get_bit_generator()
        numpy_state = np.random.get_state(legacy=False)

        def restore() -> None:
            set_bit_generator(bit_generator)
            np.random.set_state(numpy_state)

        return restore
    torch_state = torch.get_rng_state()
    return lambda: torch.set_rng_state(torch_state)


def _cuda_setters(saved: Any, lost: list[str]) -> list[tuple[str, Setter, Setter | None]]:
    """One setter per device present both here and in ``saved``; the others go into ``lost``."""
    if not isinstance(saved, list | tuple):
        raise _malformed("cuda", TypeError(f"a {type(saved).__name__}, not a list of tensors"))
    try:
        states = [_byte_tensor(s) for s in saved]
    except TypeError as exc:
        raise _malformed("cuda", exc) from exc
    here = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(states) > here:
        missing = ", ".join(f"cuda:{i}" for i in range(here, len(states)))
        lost.append(
            f"{missing} (saved on {len(states)} CUDA devices, this process has {here or 'none'})"
        )
    elif len(states) < here:
        extra = ", ".join(f"cuda:{i}" for i in range(len(states), here))
        lost.append(f"{extra} (saved on {len(states)} CUDA devices, this process has {here})")
    undo: Setter | None = None
    if _cuda_initialized() and states[:here]:
        current = torch.cuda.get_rng_state_all()
        undo = lambda: torch.cuda.set_rng_state_all(current)  # noqa: E731
    setters: list[tuple[str, Setter, Setter | None]] = []
    for index, value in enumerate(states[:here]):
        # torch queues the state until CUDA starts when it has not yet: nothing initialized here.
        setters.append(("cuda", _cuda_setter(value, index), undo if index == 0 else None))
    return setters


def _cuda_setter(value: torch.Tensor, index: int) -> Setter:
    return lambda: torch.cuda.set_rng_state(value, index)
