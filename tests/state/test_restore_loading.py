"""restore and load_into share one plan -> check -> apply path: prefixes, reports, memory."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

import torchkeep as tk

from ..helpers import MIB, run_py


class Wrapped(nn.Module):
    """What DistributedDataParallel and DataParallel look like to state_dict: ``module.``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.module = inner


def test_restore_of_a_ddp_prefixed_run_into_a_plain_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    saved = Wrapped(nn.Linear(3, 2))
    with tk.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, {"model": saved})
    plain = nn.Linear(3, 2)
    with tk.CheckpointManager(tmp_path / "run") as mgr:
        assert mgr.restore({"model": plain}) is not None
    assert torch.equal(plain.weight, saved.module.weight)
    assert torch.equal(plain.bias, saved.module.bias)
    # and the other way: a plain run restored into a wrapped model
    wrapped = Wrapped(nn.Linear(3, 2))
    with tk.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(2, {"model": plain})
        mgr.restore({"model": wrapped})
    assert torch.equal(wrapped.module.weight, plain.weight)


def test_load_into_a_run_reference_reports_the_prefix_it_stripped(tmp_path: Path) -> None:
    saved = Wrapped(nn.Linear(3, 2))
    with tk.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, {"model": saved})
    plain = nn.Linear(3, 2)
    report = tk.load_into(plain, f"{tmp_path / 'run'}@latest")
    assert sorted(report.loaded) == ["bias", "weight"]
    assert report.renamed
    assert torch.equal(plain.weight, saved.module.weight)


def test_restore_keeps_peak_memory_near_one_copy(tmp_path: Path) -> None:
    """The true peak (``VmHWM``, reset just before), not the memory left after: the packs' mapped pages must
    not sit beside the parameters. ``verify=False``: the run reader's own hash check (the
    default) still reads every pack page before the copy starts."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(2048, 2048, bias=False) for _ in range(4)])  # 64 MiB
    run = tmp_path / "run"
    with tk.CheckpointManager(run) as mgr:
        mgr.save(1, {"model": model})
    small = tmp_path / "small"
    with tk.CheckpointManager(small) as mgr:
        mgr.save(1, {"model": nn.Linear(2, 2)})
    sums = " ".join(repr(float(p.detach().double().sum())) for p in model.parameters())
    del model
    out = run_py(
        """
        sys.path.insert(0, sys.argv[3])  # the torchkeep under test, not an installed one
        import torch, torchkeep
        from torch import nn
        def reset_peak():  # Linux: "5" resets VmHWM, the peak resident set size
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        def peak():
            with open("/proc/self/status") as f:
                line = next(x for x in f if x.startswith("VmHWM:"))
            return int(line.split()[1]) * 1024
        with torchkeep.CheckpointManager(sys.argv[2], read_only=True) as mgr:  # warm up
            mgr.restore({"model": nn.Linear(2, 2)})
        for how in ("restore", "load_into"):
            torch.manual_seed(1)
            model = nn.Sequential(*[nn.Linear(2048, 2048, bias=False) for _ in range(4)])
            gc.collect()
            reset_peak()
            before = peak()
            if how == "restore":
                with torchkeep.CheckpointManager(sys.argv[1], read_only=True) as mgr:
                    mgr.restore({"model": model}, verify=False)
            else:
                torchkeep.load_into(model, sys.argv[1] + "@latest", verify=False)
            print(how, peak() - before)
            print(" ".join(repr(float(p.detach().double().sum())) for p in model.parameters()))
            del model
        """,
        str(run),
        str(small),
        str(Path(tk.__file__).parents[1]),
    )
    lines = out.strip().splitlines()
    assert len(lines) == 4
    for first, second in zip(lines[::2], lines[1::2], strict=True):
        how, grown = first.split()
        assert int(grown) < 0.5 * 64 * MIB, f"{how}: peak RSS grew by {int(grown) / MIB:.1f} MiB"
        for want, got in zip(sums.split(), second.split(), strict=True):
            assert math.isclose(float(want), float(got), rel_tol=1e-9, abs_tol=1e-6)
