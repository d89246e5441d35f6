"""How bytes are laid out: torchkeep's safetensors files, torch's format, and readers of others.

Everything here is private to torchkeep; the public API in :mod:`torchkeep.io` builds on it.
"""

from torchkeep.format._artifact import (
    FORMAT_VERSION,
    SafetensorsFile,
    metadata_json,
    write_artifact,
)
from torchkeep.format._detect import MODEL_FILE, Format, detect, resolve_path
from torchkeep.format._info import CheckpointInfo, TensorInfo
from torchkeep.format._location import MapLocation, relocate
from torchkeep.format._reader import (
    WEIGHTS_FILE,
    describe,
    inspect_file,
    load_file,
    read_model_description,
)
from torchkeep.format._safetensors import parse_json, read_into
from torchkeep.format._skeleton import flatten, unflatten
from torchkeep.format._torchfile import write_torch

__all__ = [
    "FORMAT_VERSION",
    "MODEL_FILE",
    "WEIGHTS_FILE",
    "CheckpointInfo",
    "Format",
    "MapLocation",
    "SafetensorsFile",
    "TensorInfo",
    "describe",
    "detect",
    "flatten",
    "inspect_file",
    "load_file",
    "metadata_json",
    "parse_json",
    "read_into",
    "read_model_description",
    "relocate",
    "resolve_path",
    "unflatten",
    "write_artifact",
    "write_torch",
]
