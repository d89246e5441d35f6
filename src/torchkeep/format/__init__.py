"""How bytes are laid out: torchkeep's safetensors files, torch's format, and readers of others.

Everything here is private to torchkeep; the public API in :mod:`torchkeep.io` builds on it.
"""

from torchkeep.format._artifact import (
    SafetensorsFile,
    metadata_json,
    write_artifact,
    write_pack,
)
from torchkeep.format._describe import (
    WEIGHTS_FILE,
    describe,
    model_description,
    read_model_description,
    tensors_by_path,
)
from torchkeep.format._detect import MODEL_FILE, Format, detect, resolve_path
from torchkeep.format._direct import DirectReads
from torchkeep.format._hash import (
    HashingWriter,
    file_hash,
    hash_matches,
    seal_json,
    seal_ok,
    tensor_hash,
)
from torchkeep.format._info import CheckpointInfo, FileCheck, FileInfo, TensorInfo
from torchkeep.format._json import parse_json
from torchkeep.format._location import MapLocation, map_tensors, relocate
from torchkeep.format._readers import Source
from torchkeep.format._registry import (
    INDEX_FILE,
    REGISTRY_FILE,
    REGISTRY_KIND,
    SCHEMA,
    ModelVersion,
    RegistryIndex,
    fingerprint,
    is_registry,
    parse_registry_reference,
)
from torchkeep.format._registry_source import RegistrySource, registry_checks
from torchkeep.format._run import (
    LOCK_FILE,
    MANIFEST_DIR,
    METRICS_FILE,
    PACK_DIR,
    RUN_FILE,
    Manifest,
    Ranking,
    RunReader,
    TensorRef,
    check_layout,
    clean_metrics,
    encode_manifest,
    encode_run_file,
    is_pack,
    is_pack_name,
    is_run,
    load_reference,
    manifest_name,
    pack_name,
    parse_reference,
    set_default_ranking,
    system_info,
)
from torchkeep.format._safetensors import read_into, tensor_bytes, write_safetensors
from torchkeep.format._sharded_write import write_sharded
from torchkeep.format._skeleton import Flattened, flatten
from torchkeep.format._sources import (
    READERS,
    DirectorySource,
    RunSource,
    check_file,
    inspect_file,
    load_file,
    locate,
    open_path,
    open_source,
)
from torchkeep.format._torchfile import write_torch
from torchkeep.format._unflatten import unflatten
from torchkeep.format._versions import FORMAT_VERSION, version_block

__all__ = [
    "INDEX_FILE",
    "REGISTRY_FILE",
    "REGISTRY_KIND",
    "SCHEMA",
    "ModelVersion",
    "RegistryIndex",
    "RegistrySource",
    "fingerprint",
    "is_registry",
    "parse_registry_reference",
    "registry_checks",
    "LOCK_FILE",
    "MANIFEST_DIR",
    "METRICS_FILE",
    "PACK_DIR",
    "RUN_FILE",
    "Manifest",
    "Ranking",
    "RunReader",
    "TensorRef",
    "check_layout",
    "clean_metrics",
    "encode_manifest",
    "encode_run_file",
    "is_pack",
    "is_pack_name",
    "is_run",
    "load_reference",
    "manifest_name",
    "pack_name",
    "parse_reference",
    "set_default_ranking",
    "system_info",
    "version_block",
    "tensor_bytes",
    "tensor_hash",
    "HashingWriter",
    "file_hash",
    "hash_matches",
    "seal_json",
    "seal_ok",
    "tensors_by_path",
    "write_safetensors",
    "FORMAT_VERSION",
    "MODEL_FILE",
    "WEIGHTS_FILE",
    "model_description",
    "CheckpointInfo",
    "DirectReads",
    "FileCheck",
    "READERS",
    "Source",
    "DirectorySource",
    "RunSource",
    "check_file",
    "locate",
    "open_path",
    "open_source",
    "FileInfo",
    "Flattened",
    "Format",
    "MapLocation",
    "SafetensorsFile",
    "TensorInfo",
    "describe",
    "detect",
    "flatten",
    "inspect_file",
    "load_file",
    "map_tensors",
    "metadata_json",
    "parse_json",
    "read_into",
    "read_model_description",
    "relocate",
    "resolve_path",
    "unflatten",
    "write_artifact",
    "write_sharded",
    "write_pack",
    "write_torch",
]
