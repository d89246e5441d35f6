"""Which globals torch's ``weights_only`` unpickler lets a pickle import.

A mirror of ``torch._weights_only_unpickler``'s allowlist, plus what the user added with
``torch.serialization.add_safe_globals``, minus the modules torch always blocks. The static
pickle scan (:mod:`._pickle_scan`, :mod:`._pickle_files`) reports as unsafe what it refuses.
"""

from __future__ import annotations

import functools
import importlib

__all__ = ["is_allowed_global"]

# torch never allows these modules, even when a user allowlists something from them
_BLOCKED_MODULES = frozenset({"sys", "os", "posix", "nt"})


@functools.cache
def _torch_allowed() -> frozenset[str]:
    unpickler = importlib.import_module("torch._weights_only_unpickler")
    return frozenset(unpickler._get_allowed_globals())


def _user_allowed() -> set[str]:
    import torch.serialization

    names: set[str] = set()
    for entry in torch.serialization.get_safe_globals():
        if isinstance(entry, tuple):
            if len(entry) == 2 and isinstance(entry[1], str):
                names.add(entry[1])
        else:
            names.add(f"{getattr(entry, '__module__', '?')}.{getattr(entry, '__qualname__', '?')}")
    return names


def is_allowed_global(name: str) -> bool:
    """Whether torch's ``weights_only`` unpickler lets a file import ``name`` (``module.qualname``).

    Mirrors ``torch._weights_only_unpickler``: its built-in allowlist (containers, tensor, storage
    and dtype types, the ``torch._utils._rebuild_*`` functions) plus what the user added with
    ``torch.serialization.add_safe_globals`` (read on every call), minus the modules torch always
    blocks (``sys``, ``os``, ``posix``, ``nt``; blocked here with their submodules too).
    """
    if name.split(".", 1)[0] in _BLOCKED_MODULES:
        return False
    return name in _torch_allowed() or name in _user_allowed()
