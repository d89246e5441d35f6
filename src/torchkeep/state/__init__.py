"""What a model or a training run is: loading into modules, reports, rebuilding models."""

from torchkeep.state._app import capture_app, describe_models, restore_app
from torchkeep.state._config import (
    ConfigMixin,
    capture_config,
    captured_config,
    class_path,
    import_model_class,
)
from torchkeep.state._freeze import freeze, trainable_param_groups, unfreeze
from torchkeep.state._keys import adapt_keys, renamed_state, unwrap_module
from torchkeep.state._loading import apply, check, find_state, plan
from torchkeep.state._report import LoadReport, Mismatch, Tie
from torchkeep.state._rng import RNGState

__all__ = [
    "ConfigMixin",
    "LoadReport",
    "Mismatch",
    "RNGState",
    "Tie",
    "adapt_keys",
    "apply",
    "capture_app",
    "capture_config",
    "captured_config",
    "check",
    "describe_models",
    "class_path",
    "find_state",
    "freeze",
    "import_model_class",
    "plan",
    "renamed_state",
    "restore_app",
    "trainable_param_groups",
    "unfreeze",
    "unwrap_module",
]
