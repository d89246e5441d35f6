"""``load_into``: fill a module from any checkpoint in place, checked first, at one copy of memory.

The plan -> check -> apply path is ``state.load_module``, shared with ``CheckpointManager.restore``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import nn

from torchkeep.format import (
    RegistrySource,
    RunSource,
    open_source,
)
from torchkeep.format._deferred import deferring
from torchkeep.io._save import PathLike
from torchkeep.state import (
    LoadReport,
    load_module,
)
from torchkeep.storage._location import with_options


def load_into(
    module: nn.Module,
    source: PathLike | Mapping[str, Any],
    *,
    strict: bool = True,
    skip_mismatched: bool = False,
    rename: Mapping[str, str] | None = None,
    verify: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> LoadReport:
    """Load a checkpoint into ``module`` in place, tensor by tensor, and report what happened.

    The module's state is found in the checkpoint by itself: the file may be a state dict or a
    checkpoint dict holding one (``model_state_dict``, ``state_dict``, ``model``...). Everything is
    checked before anything is copied, so a load that raises leaves the module as it was. Peak
    memory stays near one copy of the weights: tensors are read from the file straight into the
    parameters where possible. From a URL, only the tensors copied are downloaded (each checked
    against its hash), not the whole checkpoint.

    Args:
        module: the module to fill.
        source: a checkpoint path (any format :func:`load` reads) or a state dict.
        strict: raise on missing or unexpected keys. With ``strict=False`` they are reported.
        skip_mismatched: leave parameters whose shape differs (a new classifier head) at their
            current values and report them, instead of raising.
        rename: regular expression -> replacement rules applied in order to the checkpoint's
            keys (``{r"^fc[.]": "head."}``). Wrapper prefixes (``module.`` from DDP,
            ``_orig_mod.`` from ``torch.compile``, a LightningModule's ``model.``) are handled
            without rules when unambiguous. ``report.renamed`` says what was changed.
        verify: check the checkpoint's tensors against their recorded hashes before copying
            anything (torchkeep files and run checkpoints; the zip CRC-32s of other torch files).

    Returns:
        A :class:`LoadReport` with the loaded, missing, unexpected and mismatched keys.

    Raises:
        IncompatibleStateError: the state does not fit; the message has a table of differences.
    """
    source = with_options(source, storage_options)
    if isinstance(source, Mapping):
        return load_module(
            module,
            source,
            source=None,
            strict=strict,
            skip_mismatched=skip_mismatched,
            rename=rename,
        )
    reader = open_source(source)
    with deferring() as deferred:  # remote tensors: fetched (and checked) only if copied
        obj = reader.load(verify=verify)
    return load_module(
        module,
        obj,
        source=os.fspath(source),
        strict=strict,
        skip_mismatched=skip_mismatched,
        rename=rename,
        direct=True,  # just loaded, mapped from its files: no second copy of the weights
        # A file's tensors are read from it into the parameters; a run's packs, hashed just
        # now, are copied from their mapping (faster), pages dropped after (as restore does).
        read_files=not isinstance(reader, RunSource | RegistrySource),
        materialize=deferred.materialize,
    )
