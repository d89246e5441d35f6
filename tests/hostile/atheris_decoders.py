"""An atheris (libFuzzer) harness over torchkeep's decoders, with the seals recomputed.

Run by ``test_atheris.py`` in a subprocess; by hand::

    PYTHONPATH=src:. python tests/hostile/atheris_decoders.py -max_total_time=300

Each input picks a target (a torchkeep file's header, a run's manifest, or a pickle scanned and
then loaded from a torch zip) and either replaces
one to three values, found by path, with hostile values the input chooses, or splices the input's
bytes into the document's JSON text. The document is sealed again as torchkeep's writer seals it
and every decode entry point runs on it. Only a TorchkeepError may escape; any other exception is
a finding that libFuzzer reports (and writes to ``-artifact_prefix``).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import atheris
import numpy  # noqa: F401  (imported uninstrumented: only torchkeep is instrumented)
import torch

with atheris.instrument_imports(include=["torchkeep"]):
    import torchkeep as tk
    from tests.hostile._fuzzing import (
        file_entry_points,
        hostile_choices,
        outcome,
        paths,
        read_file,
        replaced,
        rich_state,
        run_entry_points,
        write_sealed_file,
        write_sealed_manifest,
    )
    from torchkeep.format._pickle_scan import scan_pickle_bytes

# libFuzzer exits without running atexit hooks: the test points this into its tmp_path
WORK = Path(
    tempfile.mkdtemp(prefix="torchkeep-atheris-", dir=os.environ.get("TORCHKEEP_ATHERIS_WORK"))
)
BASE = WORK / "base.safetensors"
RUN = WORK / "run"
warnings.simplefilter("error")  # as under pytest: a warning is a finding too
tk.save(rich_state(), BASE, metadata={"m": [1, {"x": None}]})
ENTRIES, DOC, DATA = read_file(BASE)
with tk.CheckpointManager(RUN, monitor="loss", mode="min") as _mgr:
    _mgr.save(1, rich_state(), metrics={"loss": 0.5})
MANIFEST = RUN / "checkpoints" / "0000000001.json"
PRISTINE = MANIFEST.read_bytes()
MANIFEST_DOC = json.loads(PRISTINE)
MANIFEST_DOC.pop("digest")
FILE_TREE = {"entries": ENTRIES, "doc": DOC}
FILE_PATHS = paths(FILE_TREE)[1:]
MANIFEST_PATHS = paths(MANIFEST_DOC)[1:]
TARGET = WORK / "fuzzed.safetensors"


def _value(fdp: atheris.FuzzedDataProvider, original: Any) -> Any:
    kind = fdp.ConsumeIntInRange(0, 9)
    if kind >= 5:  # mostly a hostile value of the original's kind: it gets past type checks
        return fdp.PickValueInList(hostile_choices(original))
    if kind == 0:
        return fdp.ConsumeInt(fdp.ConsumeIntInRange(1, 200))  # up to 1,600-bit integers
    if kind == 1:
        return fdp.ConsumeRegularFloat()
    if kind == 2:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 12))
    if kind == 3:
        return [fdp.ConsumeInt(9) for _ in range(fdp.ConsumeIntInRange(0, 4))]
    return ...  # delete


def _mutate(fdp: atheris.FuzzedDataProvider, tree: Any, where: list[tuple[Any, ...]]) -> Any:
    for _ in range(fdp.ConsumeIntInRange(1, 3)):
        at = fdp.PickValueInList(where)
        try:
            original = tree
            for k in at:
                if not isinstance(original, dict | list):
                    raise TypeError(k)
                original = original[k]
            tree = replaced(tree, at, _value(fdp, original))
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced what held it
    return tree


def _splice(fdp: atheris.FuzzedDataProvider, text: str) -> str:
    at = fdp.ConsumeIntInRange(0, len(text))
    cut = fdp.ConsumeIntInRange(0, 16)
    return (
        text[:at] + fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 24)) + text[at + cut :]
    )


PICKLE_PREFIXES = [
    b"",
    b"\x80\x02",
    b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00",
    b"\x80\x02}q\x00(",
]
ZIP = WORK / "fuzzed.pt"


def _pickle(choice: int, body: bytes) -> None:
    data = PICKLE_PREFIXES[choice % len(PICKLE_PREFIXES)] + body
    outcome(lambda: scan_pickle_bytes(data, max_pickles=choice))
    with zipfile.ZipFile(ZIP, "w") as archive:
        archive.writestr("archive/data.pkl", data)
        archive.writestr("archive/version", "3\n")
        archive.writestr("archive/byteorder", "little")
    outcome(lambda: tk.scan(ZIP))
    outcome(lambda: tk.load(ZIP))


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 8)
    if mode == 8:  # a pickle: the static scan alone, then in a torch zip through load
        _pickle(fdp.ConsumeIntInRange(1, 5), fdp.ConsumeBytes(fdp.remaining_bytes()))
        return
    if mode < 4:  # a torchkeep file: entries and document behind the layout digest
        if mode < 3:
            tree = _mutate(fdp, FILE_TREE, FILE_PATHS)
            entries, doc = (
                (tree.get("entries"), tree.get("doc")) if isinstance(tree, dict) else (tree, None)
            )
            write_sealed_file(TARGET, entries, doc, DATA)
        else:
            write_sealed_file(TARGET, ENTRIES, None, DATA, text=_splice(fdp, json.dumps(DOC)))
        calls = file_entry_points(TARGET)
        calls["verify"] = lambda: tk.verify(TARGET)
    else:  # a run: the manifest behind its own digest
        if mode < 7:
            write_sealed_manifest(MANIFEST, _mutate(fdp, MANIFEST_DOC, MANIFEST_PATHS))
        else:
            text = _splice(fdp, json.dumps(MANIFEST_DOC, separators=(",", ":")))
            write_sealed_manifest(MANIFEST, None, text=text)
        calls = run_entry_points(RUN, 1)
        calls["verify"] = lambda: tk.verify(RUN)
    try:
        for call in calls.values():
            outcome(call)
    finally:
        if mode >= 4:
            MANIFEST.write_bytes(PRISTINE)


def main() -> None:
    torch.set_num_threads(1)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
