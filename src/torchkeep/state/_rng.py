"""`RNGState`: the random number generators a training run draws from, as one stateful object.

Exact resume needs every generator the loop touches: Python's ``random`` (augmentations),
NumPy's global generator, torch's CPU generator (dropout, init, samplers without their own
generator) and each CUDA device's generator. Put an ``RNGState()`` in the app and the manager
saves and restores them with everything else.
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import numpy as np
import torch

from torchkeep.errors import IncompatibleStateError


class RNGState:
    """Captures and restores Python, NumPy, torch CPU and CUDA random generators.

    Args:
        python: include Python's ``random`` module.
        numpy: include NumPy's global generator (``np.random``).
        torch: include torch's CPU generator.
        cuda: include every CUDA device's generator (when CUDA is available).

    Example:
        >>> app = {"model": model, "optimizer": opt, "rng": torchkeep.RNGState()}
    """

    def __init__(
        self, *, python: bool = True, numpy: bool = True, torch: bool = True, cuda: bool = True
    ) -> None:
        self.python, self.numpy, self.torch, self.cuda = python, numpy, torch, cuda

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if self.python:
            version, internal, gauss = random.getstate()
            state["python"] = {"version": version, "state": list(internal), "gauss": gauss}
        if self.numpy:
            np_state = np.random.get_state(legacy=False)
            state["numpy"] = {
                "bit_generator": np_state["bit_generator"],
                "key": np.asarray(np_state["state"]["key"]),
                "pos": int(np_state["state"]["pos"]),
                "has_gauss": int(np_state["has_gauss"]),
                "gauss": float(np_state["gauss"]),
            }
        if self.torch:
            state["torch"] = torch.get_rng_state()
        if self.cuda and torch.cuda.is_available():
            state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            if self.python and "python" in state:
                p = state["python"]
                random.setstate((int(p["version"]), tuple(int(x) for x in p["state"]), p["gauss"]))
            if self.numpy and "numpy" in state:
                n = state["numpy"]
                np.random.set_state(
                    (
                        str(n["bit_generator"]),
                        np.asarray(n["key"], dtype=np.uint32),
                        int(n["pos"]),
                        int(n["has_gauss"]),
                        float(n["gauss"]),
                    )
                )
            if self.torch and "torch" in state:
                torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise IncompatibleStateError(
                f"the saved random generator state is malformed: {exc}",
                key="rng",
                hint="the checkpoint was damaged or saved by something else than RNGState",
            ) from exc
        saved_cuda = state.get("cuda") or []
        if not self.cuda or not saved_cuda:
            return
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        for index, s in enumerate(saved_cuda[:available]):
            torch.cuda.set_rng_state(torch.as_tensor(s, dtype=torch.uint8).cpu(), index)
        if len(saved_cuda) != available:
            warnings.warn(
                f"the checkpoint holds the RNG state of {len(saved_cuda)} CUDA devices and this "
                f"process has {available}: only {min(available, len(saved_cuda))} restored, so "
                "CUDA random numbers will not repeat exactly",
                UserWarning,
                stacklevel=2,
            )
