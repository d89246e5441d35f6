"""Loads of part of a checkpoint on a real S3 server read byte ranges, not whole packs: the
proxy in front of the server counts the bytes of every answer to a GET."""

from __future__ import annotations

from typing import Any

import pytest
import s3fs
import torch
from torch import nn

import torchkeep as tk

BIG = 8_000_000  # 32 MB of float32, unrelated to the module loaded


def _fs(options: dict[str, Any]) -> Any:
    return s3fs.S3FileSystem(
        endpoint_url=options["endpoint_url"],
        key="testing",
        secret="testing",
        skip_instance_cache=True,
    )


def _flip(fs: Any, url: str, needle: bytes) -> None:
    data = bytearray(fs.cat_file(url))
    at = data.find(needle)
    assert at >= 0 and data.find(needle, at + 1) < 0
    data[at + len(needle) // 2] ^= 0x10
    fs.pipe_file(url, bytes(data))


def test_load_into_a_part_reads_its_ranges_and_checks_them(
    bucket: str, options: dict[str, Any], proxy: Any, via_proxy: dict[str, Any]
) -> None:
    torch.manual_seed(0)
    small, big = nn.Linear(16, 4), torch.randn(BIG)
    run, single = f"{bucket}/run", f"{bucket}/both.safetensors"
    # All through the proxy: a URL keeps the options it was first used with.
    tk.save({"big": big, "model": small.state_dict()}, single, storage_options=via_proxy)
    with tk.CheckpointManager(run, storage_options=via_proxy) as mgr:
        mgr.save(1, {"big": big, "model": small, "optimizer": {"lr": 0.1}})
    fs = _fs(options)
    (pack,) = fs.ls(f"{run}/packs")
    objects = [f"s3://{pack}", single]
    assert all(fs.size(o) > BIG * 4 for o in objects)

    for ref in (f"{run}@latest", single):
        target = nn.Linear(16, 4)
        proxy.reset()
        report = tk.load_into(target, ref, storage_options=via_proxy)
        assert proxy.got_bytes < 3 << 20, (ref, proxy.got_bytes)  # of a 32 MB object
        assert report.entry == "model"
        assert torch.equal(target.weight, small.weight) and torch.equal(target.bias, small.bias)
    proxy.reset()
    back = tk.load(f"{run}@latest", storage_options=via_proxy)  # the whole: every byte
    assert proxy.got_bytes >= BIG * 4 and torch.equal(back["big"], big)

    for url in objects:  # damage in a tensor the partial load never reads
        _flip(fs, url, big[BIG // 3 : BIG // 3 + 4].numpy().tobytes())
    for ref in (f"{run}@latest", single):
        target = nn.Linear(16, 4)
        tk.load_into(target, ref, storage_options=via_proxy)
        assert torch.equal(target.weight, small.weight)
        with pytest.raises(tk.CorruptCheckpointError, match="does not match its hash"):
            tk.load(ref, storage_options=via_proxy)

    for url in objects:  # damage in the tensor it reads: still caught, nothing copied
        _flip(fs, url, small.weight.detach().numpy().tobytes())
    for ref in (f"{run}@latest", single):
        target = nn.Linear(16, 4)
        before = target.weight.detach().clone()
        with pytest.raises(tk.CorruptCheckpointError, match="does not match its hash") as info:
            tk.load_into(target, ref, storage_options=via_proxy)
        assert info.value.key is not None and info.value.key.endswith("weight")
        assert torch.equal(target.weight, before)
