"""Model versioning: a registry a team shares without a server (``tk.Registry``).

``_registry.py`` is the public class (register, aliases, lineage, verify, compare, delete);
``_store.py`` the order in which packs and index rows are written and collected (crash safety);
``_inputs.py`` what a source (module, state dict, file, run reference) gives; ``_records.py`` the
reports. The on-disk layout and the read side (``REGISTRY/NAME@VERSION`` references) are
``format/_registry.py``'s, so that ``load`` and the other verbs resolve them from below.
"""

from torchkeep.format import ModelVersion
from torchkeep.registry._records import (
    AliasMove,
    Comparison,
    Lineage,
    RegistryReport,
    TensorComparison,
)
from torchkeep.registry._registry import Registry

__all__ = [
    "AliasMove",
    "Comparison",
    "Lineage",
    "ModelVersion",
    "Registry",
    "RegistryReport",
    "TensorComparison",
]
