"""A run of checkpoints on disk, end to end: its layout, its documents, reading it.

::

    RUN/
      torchkeep_run.json            the run: format version and retention policy
      checkpoints/0000000042.json   one manifest per committed checkpoint (step 42)
      packs/<step>-<rand>.safetensors   immutable tensor packs (torchkeep safetensors files)
      metrics.jsonl                 every metrics record ever saved, one JSON object a line
      .lock                         held (flock) by the one writer

A manifest lists every tensor of its checkpoint as (pack, key, dtype, shape, nbytes, hash) next to
the JSON skeleton of the saved state, its metrics and metadata, and, under ``"models"``, how to
rebuild each model of the app whose constructor arguments are known: ``{app_key: {"class":
"pkg.mod:Name", "config": <skeleton of the keyword arguments>}}`` (absent when there is none).
A checkpoint is committed when its manifest is renamed into ``checkpoints/``, after its packs were
fsynced: that rename is the single commit point. Readers trust only committed manifests; a pack
that no manifest names is garbage left by a crash, and the next writer sweeps it (only a file
with a pack's name whose header says ``"kind": "torchkeep-pack"``: a name is no proof). A tensor
whose bytes are already stored in the run is referenced again, not rewritten, so several
manifests may share a pack.

Nothing below the run's root may be a symbolic link (``_confine.py``): a run never reads, writes
or deletes outside itself.

References: ``RUN@latest``, ``RUN@best``, ``RUN@<step>``, or ``RUN`` alone (the latest).

The package, by concern:

- ``_layout.py``: file and folder names, manifest and pack naming, ``is_pack``, ``is_run``,
  ``check_layout``, ``parse_reference``;
- ``_manifest.py``: the manifest and run-description schema, written and read in one module;
- ``_reader.py``: ``RunReader`` and ``load_reference``, safe beside a writer (why there, and how
  ``RUN@best`` gets its ranking from the manager without an upward import).
"""

from torchkeep.format._run._layout import (
    LOCK_FILE,
    MANIFEST_DIR,
    METRICS_FILE,
    PACK_DIR,
    RUN_FILE,
    check_layout,
    committed_steps,
    is_pack,
    is_pack_name,
    is_run,
    manifest_name,
    pack_name,
    parse_reference,
)
from torchkeep.format._run._manifest import (
    Manifest,
    TensorRef,
    as_float,
    clean_metrics,
    encode_manifest,
    encode_run_file,
    read_manifest,
    read_run_file,
    system_info,
)
from torchkeep.format._run._reader import (
    READ_ATTEMPTS,
    Ranking,
    RunReader,
    load_reference,
    set_default_ranking,
)

__all__ = [
    "LOCK_FILE",
    "MANIFEST_DIR",
    "METRICS_FILE",
    "PACK_DIR",
    "READ_ATTEMPTS",
    "RUN_FILE",
    "Manifest",
    "Ranking",
    "RunReader",
    "TensorRef",
    "as_float",
    "check_layout",
    "clean_metrics",
    "committed_steps",
    "encode_manifest",
    "encode_run_file",
    "is_pack",
    "is_pack_name",
    "is_run",
    "load_reference",
    "manifest_name",
    "pack_name",
    "parse_reference",
    "read_manifest",
    "read_run_file",
    "set_default_ranking",
    "system_info",
]
