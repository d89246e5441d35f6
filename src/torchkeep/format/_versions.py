"""The versions block every JSON document torchkeep writes starts with.

One helper, so that the single files, packs, ``.pt`` metadata, model descriptions and manifests
say the same thing in the same words and order: ``format_version`` (what readers check, see
``check_format_version``), then ``torchkeep_version`` and ``torch_version`` (informational: who
wrote the file, with what).
"""

from __future__ import annotations

import torch

from torchkeep._version import __version__

FORMAT_VERSION = "1.0"


def version_block(*, with_format: bool = True) -> dict[str, str]:
    """``{"format_version", "torchkeep_version", "torch_version"}``, in that order.

    Args:
        with_format: ``False`` leaves out ``format_version``, for the informational records
            (a manifest's ``system``, a demo's metadata) where readers check no version.
    """
    software = {"torchkeep_version": __version__, "torch_version": str(torch.__version__)}
    return {"format_version": FORMAT_VERSION, **software} if with_format else software
