"""What a model or a training run is: loading into modules, reports, rebuilding models."""

from torchkeep.state._app import capture_app, describe_models, restore_app
from torchkeep.state._config import (
    AllowImport,
    ConfigMixin,
    allowed_modules,
    capture_config,
    captured_config,
    checked_model_class,
    class_path,
    import_model_class,
)
from torchkeep.state._freeze import freeze, trainable_param_groups, unfreeze
from torchkeep.state._keys import adapt_keys, renamed_state, unwrap_module
from torchkeep.state._loading import (
    apply,
    check,
    copy_into,
    find_state,
    load_module,
    plan,
    prepare,
)
from torchkeep.state._report import LoadReport, Mismatch, Tie
from torchkeep.state._rng import RNGState

__all__ = [
    "AllowImport",
    "ConfigMixin",
    "LoadReport",
    "Mismatch",
    "RNGState",
    "Tie",
    "adapt_keys",
    "allowed_modules",
    "apply",
    "capture_app",
    "capture_config",
    "captured_config",
    "check",
    "copy_into",
    "checked_model_class",
    "describe_models",
    "class_path",
    "find_state",
    "freeze",
    "import_model_class",
    "load_module",
    "plan",
    "prepare",
    "renamed_state",
    "restore_app",
    "trainable_param_groups",
    "unfreeze",
    "unwrap_module",
]
