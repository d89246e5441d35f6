"""Every byte of a manifest and of a safetensors header torchkeep wrote is under its seal.

JSON and safetensors leave bytes free that change no value: whitespace after a document, the
spaces that pad a header, the case of a ``\\u`` escape. A seal over values only lets those change
unseen; these tests change them one at a time and expect ``restore``/``load`` and ``verify`` to
refuse every one.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import torchkeep as tk

# Replacements that keep JSON valid where the original byte is whitespace or a letter: the
# cases a seal over parsed values misses.
_WHITESPACE = b" \t\n\r"


def _variants(data: bytes, start: int, end: int) -> Iterator[bytes]:
    """``data`` with one byte in ``[start, end)`` changed, for each replacement that differs."""
    for i in range(start, end):
        old = data[i]
        for new in {old ^ 0x01, old ^ 0x20, *_WHITESPACE}:
            if new != old:
                yield data[:i] + bytes([new]) + data[i + 1 :]


def _ends(data: bytes) -> list[bytes]:
    """``data`` with its end changed: bytes appended, the last one removed or doubled."""
    return [data + b"\n", data + b" ", data + b"\r\n", data[:-1], data[:-1] + b"\r\n"]


def _run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    with tk.CheckpointManager(run) as mgr:
        state = {"w\u00e9": torch.arange(6, dtype=torch.float32), "b": torch.ones(2)}
        mgr.save(0, {"state": state, "epoch": 3}, metrics={"loss": 1e-05})
    return run


def _refused_by_restore(run: Path) -> bool:
    try:
        tk.load(f"{run}@latest")
    except tk.CorruptCheckpointError:
        return True
    return False


def _header_end(data: bytes) -> int:
    (n,) = struct.unpack("<Q", data[:8])
    return 8 + int(n)


def test_a_changed_end_of_a_manifest_is_refused_by_restore_and_verify(tmp_path: Path) -> None:
    run = _run(tmp_path)
    manifest = run / "checkpoints" / "0000000000.json"
    original = manifest.read_bytes()
    assert original.endswith(b"}\n")
    for data in _ends(original):
        manifest.write_bytes(data)
        assert _refused_by_restore(run), data[-4:]
        assert not tk.verify(f"{run}@latest").ok, data[-4:]
        assert not tk.verify(run).ok, data[-4:]
    manifest.write_bytes(original)
    assert tk.verify(run).ok


def test_a_changed_padding_byte_of_a_pack_header_is_refused_by_restore(tmp_path: Path) -> None:
    run = _run(tmp_path)
    (pack,) = (run / "packs").iterdir()
    original = pack.read_bytes()
    end = _header_end(original)
    assert original[end - 1 : end] == b" "  # padded to 64 bytes, as the writer does
    for new in (b"\t", b"\n", b"\r"):
        pack.write_bytes(original[: end - 1] + new + original[end:])
        assert _refused_by_restore(run), new
        assert not tk.verify(f"{run}@latest").ok, new


def test_a_changed_padding_byte_of_a_single_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "one.safetensors"
    tk.save({"w": torch.ones(3)}, path)
    original = path.read_bytes()
    end = _header_end(original)
    assert original[end - 1 : end] == b" "
    path.write_bytes(original[: end - 1] + b"\n" + original[end:])
    with pytest.raises(tk.CorruptCheckpointError, match="laid out"):
        tk.load(path)
    assert not tk.verify(path).ok


def test_plain_safetensors_files_keep_their_own_padding(tmp_path: Path) -> None:
    """The layout check applies to files torchkeep sealed; other writers pad as they like."""
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(3)}, str(path))
    data = path.read_bytes()
    end = _header_end(data)
    path.write_bytes(data[: end - 1] + b"\n" + data[end:] if data[end - 1 : end] == b" " else data)
    assert torch.equal(tk.load(path)["w"], torch.ones(3))


@pytest.mark.slow
def test_every_changed_byte_of_a_run_s_manifest_and_pack_header_is_refused(
    tmp_path: Path,
) -> None:
    run = _run(tmp_path)
    (manifest,) = (run / "checkpoints").iterdir()
    (pack,) = (run / "packs").iterdir()
    tried = refused_by_restore = refused_by_verify = 0
    for path, end in ((manifest, None), (pack, _header_end(pack.read_bytes()))):
        original = path.read_bytes()
        changed = list(_variants(original, 0, end or len(original)))
        if end is None:
            changed += _ends(original)
        for data in changed:
            path.write_bytes(data)
            tried += 1
            refused_by_restore += _refused_by_restore(run)
            refused_by_verify += not tk.verify(f"{run}@latest").ok
        path.write_bytes(original)
    assert tk.verify(run).ok
    assert tried > 5000
    assert refused_by_restore == tried, f"restore took {tried - refused_by_restore} of {tried}"
    assert refused_by_verify == tried, f"verify missed {tried - refused_by_verify} of {tried}"


@pytest.mark.slow
def test_every_changed_byte_of_a_single_file_s_header_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.safetensors"
    tk.save({"w\u00e9": torch.arange(6.0), "lr": 1e-05}, path, metadata={"note": "caf\u00e9"})
    original = path.read_bytes()
    tried = refused = 0
    for data in _variants(original, 0, _header_end(original)):
        path.write_bytes(data)
        tried += 1
        try:
            tk.load(path)
        except tk.CorruptCheckpointError:
            refused += 1
            assert not tk.verify(path).ok
    assert tried > 1000
    assert refused == tried, f"{tried - refused} of {tried} changed headers went unnoticed"


def _rewrite_header(path: Path, edit: Any) -> None:
    """Re-lay the header of ``path`` after ``edit(header)``, compactly and padded as written."""
    import json

    from torchkeep.format._safetensors import canonical_header

    data = path.read_bytes()
    end = _header_end(data)
    header = json.loads(data[8:end])
    blob = canonical_header(edit(header))
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data[end:])


def test_a_reordered_header_is_refused(tmp_path: Path) -> None:
    """Moving keys changes bytes but no value: the seal must see it all the same."""
    path = tmp_path / "two.safetensors"
    tk.save({"a": torch.ones(2), "b": torch.zeros(3)}, path)
    original = path.read_bytes()
    edits = {
        "tensors swapped": lambda h: {"__metadata__": h["__metadata__"], "b": h["b"], "a": h["a"]},
        "metadata last": lambda h: {k: h[k] for k in ("a", "b", "__metadata__")},
        "metadata keys": lambda h: {**h, "__metadata__": dict(reversed(h["__metadata__"].items()))},
        "entry fields": lambda h: {
            k: v if k == "__metadata__" else dict(reversed(v.items())) for k, v in h.items()
        },
    }
    for name, edit in edits.items():
        path.write_bytes(original)
        _rewrite_header(path, edit)
        assert path.read_bytes() != original, name
        with pytest.raises(tk.CorruptCheckpointError, match="laid out"):
            tk.load(path)
        assert not tk.verify(path).ok, name
    path.write_bytes(original)
    _rewrite_header(path, lambda h: h)  # the same layout again: accepted
    assert torch.equal(tk.load(path)["b"], torch.zeros(3))


def test_every_changed_byte_of_a_model_description_is_refused(tmp_path: Path) -> None:
    from tests.models import MLP

    tk.save_model(MLP(hidden=3), tmp_path / "m", config={"hidden": 3})
    description = tmp_path / "m" / "torchkeep_model.json"
    original = description.read_bytes()
    assert original.endswith(b"}\n")
    changed = [*_variants(original, 0, len(original)), *_ends(original)]
    refused = 0
    for data in changed:
        description.write_bytes(data)
        try:
            tk.load_model(tmp_path / "m")
        except tk.CorruptCheckpointError:
            refused += 1
    assert len(changed) > 1000
    assert refused == len(changed), f"{len(changed) - refused} of {len(changed)} went unnoticed"
    description.write_bytes(original)
    assert type(tk.load_model(tmp_path / "m")) is MLP
