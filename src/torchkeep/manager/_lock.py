"""Moved to :mod:`torchkeep.storage._lock`; kept so that ``manager`` imports keep working."""

from torchkeep.storage._lock import RunLock as RunLock
