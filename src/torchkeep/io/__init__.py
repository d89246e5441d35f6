"""Single-artifact save and load: the verbs most users need.

``save``/``load`` move nested states (state dicts, tutorial-style checkpoint dicts) to and from
one file; ``load_into`` fills a module from any checkpoint; ``save_model``/``load_model`` keep a
whole model (weights plus how to rebuild it) without pickle; ``inspect`` describes a file;
``convert`` rewrites one in another format; ``verify``/``scan`` check one without trusting it;
``diff`` compares two. One private module per verb; every verb opens its checkpoint through the
registry of readers (``format/_sources.py``).
"""

from torchkeep.format import FileCheck
from torchkeep.format._pickle_files import PickleScan
from torchkeep.io._convert import CONVERT_SUFFIXES, convert
from torchkeep.io._diff import DiffReport, TensorDiff, diff
from torchkeep.io._inspect import inspect
from torchkeep.io._load import load
from torchkeep.io._load_into import load_into
from torchkeep.io._models import load_model, save_model
from torchkeep.io._save import TORCH_SUFFIXES, PathLike, save
from torchkeep.io._scan import DirectoryScan, scan
from torchkeep.io._verify import verify
from torchkeep.io._verify_report import VerifyReport

__all__ = [
    "CONVERT_SUFFIXES",
    "TORCH_SUFFIXES",
    "DiffReport",
    "DirectoryScan",
    "FileCheck",
    "PathLike",
    "PickleScan",
    "TensorDiff",
    "VerifyReport",
    "convert",
    "diff",
    "inspect",
    "load",
    "load_into",
    "load_model",
    "save",
    "save_model",
    "scan",
    "verify",
]
