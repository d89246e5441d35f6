"""The run's retention policy on open: merged over the stored one, its changes remembered.

Retention deletes checkpoints, so a policy changed by a mistyped argument on resume must be seen
(a ``UserWarning``) and the run must remember what it kept by before: every change is appended
to ``policy_history`` in ``torchkeep_run.json``. The document itself is the format's
(``encode_run_file``, read back by ``RunReader``).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torchkeep.format import (
    MANIFEST_DIR,
    PACK_DIR,
    RUN_FILE,
    RunReader,
    check_layout,
    encode_run_file,
)
from torchkeep.manager._retention import RetentionPolicy
from torchkeep.manager._writer import write_bytes
from torchkeep.storage import storage_for
from torchkeep.storage._local import storage_error


def create_run(root: Path) -> None:
    """Create the run's folders (when missing), refusing a run whose entries are links before
    anything is written, locked or swept, and again after."""
    if root.is_dir():
        check_layout(root)
    store = storage_for(root)
    try:
        store.makedirs(str(root / MANIFEST_DIR))
        store.makedirs(str(root / PACK_DIR))
    except OSError as exc:  # the system's error, not the store's: this message names the run
        cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
        raise storage_error(cause, root, "create the run directory") from cause
    check_layout(root)


def open_policy(root: Path, given: Mapping[str, Any]) -> RetentionPolicy:
    """The policy of the run at ``root``: ``given`` arguments (those not ``None``) over the
    stored ones; the run file is (re)written when it is new or the policy changed.

    Called with the run's writer lock held. The warning names the caller of
    ``CheckpointManager(...)`` (``stacklevel``).
    """
    existing = RunReader(root) if (root / RUN_FILE).is_file() else None
    stored = existing.policy if existing is not None else {}
    policy = RetentionPolicy.from_dict({**stored, **given_values(given)})
    history = _policy_history(existing.description) if existing is not None else []
    if existing is not None and RetentionPolicy.from_dict(stored) != policy:
        before = RetentionPolicy.from_dict(stored)
        warnings.warn(
            f"{root}: the run's retention policy changes from "
            f"{_policy_text(before)} to {_policy_text(policy)}; the change is "
            f"recorded in {RUN_FILE} (policy_history). Open the run without retention "
            "arguments to keep its stored policy",
            UserWarning,
            stacklevel=3,
        )
        history.append({"time": time.time(), "from": before.to_dict(), "to": policy.to_dict()})
    if existing is None or stored != policy.to_dict():
        text = encode_run_file(policy.to_dict(), history)
        storage_for(root).write_atomic(str(root / RUN_FILE), lambda f: write_bytes(f, text))
    return policy


def given_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments actually given (``None`` means: keep the stored value)."""
    return {k: v for k, v in values.items() if v is not None}


def _policy_text(policy: RetentionPolicy) -> str:
    rules = ", ".join(f"{k}={v!r}" for k, v in policy.to_dict().items() if v is not None)
    return f"({rules})"


def _policy_history(description: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The recorded policy changes of a run file, oldest first (entries that are not objects
    are dropped: the history informs, it decides nothing)."""
    history = description.get("policy_history", [])
    return [h for h in history if isinstance(h, dict)] if isinstance(history, list) else []
