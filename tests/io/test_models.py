"""torchkeep.save_model / load_model end to end, and save's refusal of whole modules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import torchkeep
from torchkeep import UnsupportedValueError

from ..helpers import SUFFIXES
from ..models import MLP, BNNet, CapturedNet, fill_


def test_save_model_load_model_end_to_end(tmp_path: Path) -> None:
    model = fill_(CapturedNet(4, hidden=7, act="tanh", widths=(1, 2)), 5)
    torchkeep.save_model(model, tmp_path / "net")
    rebuilt = torchkeep.load_model(tmp_path / "net")
    assert type(rebuilt) is CapturedNet and not rebuilt.training
    assert rebuilt.act == "tanh" and rebuilt.widths == (1, 2)
    x = torch.randn(3, 4)
    assert torch.equal(rebuilt(x), model.eval()(x))
    info = torchkeep.inspect(tmp_path / "net")
    assert info.format == "torchkeep-model"
    assert {t.name for t in info.tensors} == set(model.state_dict())


def test_load_model_eval_mode_matters(tmp_path: Path) -> None:
    model = fill_(BNNet(), 6)
    model.train()
    model(torch.randn(16, 4))  # moves the running stats
    torchkeep.save_model(model, tmp_path / "bn", config={"d": 4})
    rebuilt = torchkeep.load_model(tmp_path / "bn", map_location="cpu")
    assert all(not m.training for m in rebuilt.modules())
    x = torch.randn(5, 4)
    assert torch.equal(rebuilt(x), model.eval()(x))
    assert rebuilt.bn.num_batches_tracked.item() == 1


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_saving_a_module_names_state_dict_and_save_model(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"
    for obj in (MLP(), {"epoch": 1, "model": MLP()}):
        with pytest.raises(UnsupportedValueError) as caught:
            torchkeep.save(obj, path)
        err = caught.value
        assert "torch.nn.Module (MLP)" in err.message
        assert "model.state_dict()" in (err.hint or "") and "tk.save_model" in (err.hint or "")
        assert err.path == str(path) and str(path) in str(err)
        assert not path.exists()


def test_save_model_of_a_main_class_warns_and_says_how_to_fix(tmp_path: Path) -> None:
    # A class of the running script: `torchkeep_model.json` records `__main__:Net`, which any
    # other program (a server, a notebook) resolves to its own `__main__`.
    net = type("Net", (nn.Module,), {"__module__": "__main__"})
    with pytest.warns(UserWarning, match="defined in __main__") as caught:
        torchkeep.save_model(net(), tmp_path / "net", config={})
    text = str(caught[0].message)
    assert "only that same script can load" in text
    assert "move the class into a module" in text and str(tmp_path / "net") in text
    assert (tmp_path / "net" / "torchkeep_model.json").is_file()
