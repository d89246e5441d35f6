"""What a model or a training run is: loading into modules, reports, rebuilding models."""

from torchkeep.state._config import (
    ConfigMixin,
    capture_config,
    captured_config,
    class_path,
    import_model_class,
)
from torchkeep.state._loading import apply, check, find_state, plan
from torchkeep.state._report import LoadReport, Mismatch

__all__ = [
    "ConfigMixin",
    "LoadReport",
    "Mismatch",
    "apply",
    "capture_config",
    "captured_config",
    "check",
    "class_path",
    "find_state",
    "import_model_class",
    "plan",
]
