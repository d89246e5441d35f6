"""Remembering how a model was built, so that it can be rebuilt without pickle.

``torchkeep.save_model`` stores a model's class as an import path plus the keyword arguments of
its constructor. Those arguments are captured when the model is built, by decorating the class
with :func:`capture_config` or deriving it from :class:`ConfigMixin`; ``save_model(config=...)``
overrides them.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from torch import nn

from torchkeep.errors import ModelClassError, UnsupportedValueError

CONFIG_ATTR = "_torchkeep_config"
T = TypeVar("T", bound=type)


def _wrap_init(init: Callable[..., None]) -> Callable[..., None]:
    signature = inspect.signature(init)
    if getattr(init, "__torchkeep_wrapped__", False):
        return init

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        # The outermost constructor runs its capture last, so a subclass's arguments win.
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        config: dict[str, Any] = {}
        for i, (name, value) in enumerate(bound.arguments.items()):
            kind = signature.parameters[name].kind
            if i == 0:
                continue  # self
            if kind is inspect.Parameter.VAR_KEYWORD:
                config.update(value)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                if value:
                    config["*" + name] = list(value)
            else:
                config[name] = value
        object.__setattr__(self, CONFIG_ATTR, config)

    __init__.__torchkeep_wrapped__ = True  # type: ignore[attr-defined]  # a marker on the wrapper function
    return __init__


def capture_config(cls: T) -> T:
    """Class decorator: record the constructor's arguments of every instance for ``save_model``.

    Example:
        >>> @torchkeep.capture_config
        ... class Net(nn.Module):
        ...     def __init__(self, width: int = 64): ...
        >>> torchkeep.save_model(Net(width=128), "net/")  # rebuilt later as Net(width=128)
    """
    cls.__init__ = _wrap_init(cls.__init__)  # type: ignore[misc]  # cls is the class; rewrapping its __init__ is the point
    return cls


class ConfigMixin:
    """Mixin with the same effect as :func:`capture_config` for a class and all its subclasses."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _wrap_init(cls.__dict__["__init__"])  # type: ignore[method-assign]  # rewrapping the subclass __init__ is the point


def captured_config(model: nn.Module) -> dict[str, Any] | None:
    """The constructor arguments recorded for ``model``, or ``None``."""
    config = getattr(model, CONFIG_ATTR, None)
    if config is not None and any(k.startswith("*") for k in config):
        raise UnsupportedValueError(
            f"{type(model).__qualname__} was built with positional *args, which cannot be "
            "replayed as keyword arguments",
            hint="pass config={...} to save_model",
        )
    return config


def class_path(cls: type) -> str:
    """``package.module:QualName`` for an importable class; refuses local classes."""
    if "<locals>" in cls.__qualname__:
        raise ModelClassError(
            f"{cls.__qualname__} is defined inside a function, so it cannot be imported later",
            hint="define the class at module level in an importable module",
        )
    return f"{cls.__module__}:{cls.__qualname__}"


AllowImport = str | Iterable[str] | None


def allowed_modules(allow_import: AllowImport) -> tuple[str, ...]:
    """``allow_import`` as a tuple of module names or prefixes; a ``TypeError`` otherwise."""
    if allow_import is None:
        return ()
    names = (allow_import,) if isinstance(allow_import, str) else tuple(allow_import)
    if not all(isinstance(n, str) and n for n in names):
        raise TypeError(f"allow_import takes module names or prefixes, not {allow_import!r}")
    return names


def import_allowed(module_name: str, allow_import: AllowImport) -> bool:
    """True when importing ``module_name`` runs no code the caller did not allow: it is already
    imported in this process, or it is (or lies under) a name in ``allow_import``."""
    names = allowed_modules(allow_import)
    if module_name in sys.modules:
        return True
    return any(
        module_name == name or module_name.startswith(name.rstrip(".") + ".") for name in names
    )


def import_model_class(
    path: str, *, source: str, allow_import: AllowImport = None
) -> type[nn.Module]:
    """Import the ``module:QualName`` recorded in a model directory; it must be an ``nn.Module``.

    The name comes from a file, so it is checked before anything is imported: importing a
    module runs its code, and any installed module would do. The module must already be
    imported in this process or be allowed by ``allow_import``; otherwise nothing is imported.
    Attributes are looked up without triggering a module's ``__getattr__`` (lazy imports).

    Raises:
        ModelClassError: the module is not allowed, cannot be imported, or the name is not an
            ``nn.Module`` subclass.
    """
    module_name, _, qualname = path.partition(":")
    if not module_name or not qualname:
        raise ModelClassError(f"invalid class path {path!r}", path=source)
    if not import_allowed(module_name, allow_import):
        raise ModelClassError(
            f"refusing to import {module_name!r} for the model class {path}: the name "
            "comes from the checkpoint, and importing a module runs its code",
            path=source,
            key=path,
            hint=f"allow the module (allow_import={module_name.partition('.')[0]!r}) if you "
            f"trust it, pass the class (model_class={qualname.rpartition('.')[2]}), or import "
            "the module before loading",
        )
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = inspect.getattr_static(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ModelClassError(
            f"cannot import the model class {path}: {exc}",
            path=source,
            key=path,
            hint=f"install or put on sys.path the package that defines {qualname}"
            + (
                " (classes defined in a script's __main__ only exist while it runs)"
                if module_name == "__main__"
                else ""
            ),
        ) from exc
    return checked_model_class(obj, path, source=source)


def checked_model_class(obj: Any, path: str, *, source: str) -> type[nn.Module]:
    """``obj`` when it is an ``nn.Module`` subclass; never called otherwise."""
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise ModelClassError(
            f"{path} is not a torch.nn.Module subclass; refusing to call it",
            path=source,
            key=path,
            hint="the model description may have been tampered with",
        )
    return obj
