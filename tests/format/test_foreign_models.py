"""A corpus of files from the writers people use, read back exactly.

Hugging Face ``save_pretrained`` (sharded with a small ``max_shard_size``, and single-file) and
``safetensors.torch.save_model`` of tiny GPT-2 and T5 models built from configs (no download).
Both writers store each tied tensor once, under one of its names, and lay out the header their
own way; ``tk.load``, ``tk.inspect`` and a strict ``tk.load_into`` into a fresh model of the same
config must take every such file as it is.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
import transformers
from torch import nn

import torchkeep as tk
from torchkeep.format import Format, detect


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=100,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config).eval()


def t5() -> nn.Module:
    config = transformers.T5Config(
        d_model=16,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        d_kv=8,
        vocab_size=50,
        decoder_start_token_id=0,
    )
    return transformers.T5ForConditionalGeneration(config).eval()


BUILD = {"gpt2": gpt2, "t5": t5}
# Each model's groups of names for one tensor (the writers keep one name of each group).
TIES = {
    "gpt2": [{"transformer.wte.weight", "lm_head.weight"}],
    "t5": [
        {
            "shared.weight",
            "encoder.embed_tokens.weight",
            "decoder.embed_tokens.weight",
            "lm_head.weight",
        }
    ],
}


def built(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return BUILD[name]()


def outputs(model: nn.Module) -> torch.Tensor:
    ids = torch.tensor([[1, 5, 7, 3]])
    with torch.no_grad():
        if isinstance(model, transformers.T5ForConditionalGeneration):
            return model(input_ids=ids, decoder_input_ids=ids).logits
        return model(input_ids=ids).logits


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def assert_tied(report: tk.LoadReport, name: str, model: nn.Module, kept: set[str]) -> None:
    """The report lists every dropped name of a tie as tied to the name the file kept."""
    expected = set()
    for group in TIES[name]:
        (provided,) = group & kept
        expected |= {(k, provided) for k in group - {provided}}
    assert {(t.key, t.to) for t in report.tied} == expected
    assert report.ok and report.missing == () and report.unexpected == ()
    assert set(report.loaded) == kept
    assert len(report.loaded) + len(report.tied) == len(model.state_dict())


def header_length(path: Path) -> int:
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    return n


@pytest.mark.parametrize("name", ["gpt2", "t5"])
@pytest.mark.parametrize("shard", ["20KB", None])
def test_save_pretrained_loads_strictly_into_the_same_architecture(
    tmp_path: Path, name: str, shard: str | None
) -> None:
    model = built(name, 0)
    kwargs: dict[str, Any] = {} if shard is None else {"max_shard_size": shard}
    model.save_pretrained(tmp_path / "hf", **kwargs)
    files = sorted((tmp_path / "hf").glob("*.safetensors"))
    index = tmp_path / "hf" / "model.safetensors.index.json"
    assert (len(files) > 1) == (shard is not None) and index.exists() == (shard is not None)
    for f in files:  # every shard, whatever its header length (0x180 starts like a pickle)
        assert detect(f) is Format.SAFETENSORS, (f.name, hex(header_length(f)))
    kept = {k for f in files for k in safetensors.torch.load_file(str(f))}
    if shard is not None:
        assert set(json.loads(index.read_text())["weight_map"]) == kept

    info = tk.inspect(tmp_path / "hf")
    if shard is None:  # one weights file beside config.json: shown as a checkpoint directory
        assert info.format == "checkpoint-dir"
        assert {t.name for t in info.tensors} == {f"model.safetensors/{k}" for k in kept}
        info = tk.inspect(tmp_path / "hf" / "model.safetensors")
    assert info.format == ("hf-sharded" if shard else "safetensors")
    assert {t.name for t in info.tensors} == kept
    loaded = tk.load(tmp_path / "hf")
    state = model.state_dict()
    assert loaded.keys() == kept
    assert all(torch.equal(loaded[k], state[k]) for k in kept)

    fresh = built(name, 1)
    report = tk.load_into(fresh, tmp_path / "hf")  # strict by default
    assert_tied(report, name, fresh, kept)
    assert_same_state(fresh, model)
    assert torch.equal(outputs(fresh), outputs(model))
    if name == "gpt2":
        assert fresh.lm_head.weight is fresh.transformer.wte.weight  # still one tensor
    assert "tied" in str(report) and report.to_dict()["tied"]


@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_safetensors_save_model_loads_strictly(tmp_path: Path, name: str) -> None:
    model = built(name, 0)
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_model(model, str(path))
    kept = set(safetensors.torch.load_file(str(path)))
    assert len(kept) < len(model.state_dict())  # it dropped the tied duplicates
    fresh = built(name, 1)
    report = tk.load_into(fresh, path)
    assert_tied(report, name, fresh, kept)
    assert_same_state(fresh, model)
    assert torch.equal(outputs(fresh), outputs(model))
    # and safetensors' own loader into torchkeep's copy agrees
    again = built(name, 2)
    missing, unexpected = safetensors.torch.load_model(again, str(path))
    assert not missing and not unexpected
    assert_same_state(again, fresh)


def test_a_torchkeep_save_of_a_tied_model_keeps_every_name(tmp_path: Path) -> None:
    model = built("gpt2", 0)
    tk.save(model.state_dict(), tmp_path / "tk.safetensors")
    fresh = built("gpt2", 1)
    report = tk.load_into(fresh, tmp_path / "tk.safetensors")
    assert report.ok and report.tied == ()  # both names are in the file: nothing to fill
    assert_same_state(fresh, model)


def test_a_wrong_architecture_is_refused_with_the_closest_prefix(tmp_path: Path) -> None:
    model = built("gpt2", 0)
    model.save_pretrained(tmp_path / "hf")
    body = transformers.GPT2Model(model.config)  # the file's keys carry "transformer."
    report = tk.load_into(body, tmp_path / "hf")  # a common prefix: stripped, unambiguous
    assert report.ok and report.renamed == ("stripped prefix 'transformer.'",)
    other = built("t5", 0)
    with pytest.raises(tk.IncompatibleStateError, match="no tensor would be loaded") as err:
        tk.load_into(other, tmp_path / "hf", strict=False)
    hint = err.value.hint or ""
    assert "strict=False" not in hint and "skip_mismatched" not in hint
    assert "no prefix change aligns" in hint and "'transformer." in hint


def test_save_pretrained_into_a_data_parallel_model(tmp_path: Path) -> None:
    model = built("gpt2", 0)
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    wrapped = nn.DataParallel(built("gpt2", 1))
    report = tk.load_into(wrapped, tmp_path / "hf")
    assert report.ok and report.renamed == ("added prefix 'module.' (DataParallel/DDP)",)
    assert [(t.key, t.to) for t in report.tied] == [
        ("module.lm_head.weight", "module.transformer.wte.weight")
    ]
    assert_same_state(wrapped.module, model)
