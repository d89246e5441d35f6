"""Deferred remote loads: the contexts asyncio copies do not keep a load's tensors alive."""

from __future__ import annotations

import contextvars
import gc
import weakref

from torchkeep.format._deferred import current, deferring, handed_on, handing_on


def test_contexts_copied_inside_a_deferred_load_do_not_keep_it_alive() -> None:
    # asyncio copies the caller's context into every callback it schedules, so fsspec's event
    # loop thread (a daemon) held such copies; one that still referred to the deferred load
    # freed its tensors during interpreter shutdown, which aborted the process (exit 134).
    with deferring() as deferred:
        assert current() is deferred
        with handing_on(deferred):
            assert handed_on() is deferred
            copied = contextvars.copy_context()
    assert current() is None and handed_on() is None
    assert copied.run(current) is None and copied.run(handed_on) is None
    alive = weakref.ref(deferred)
    del deferred
    gc.collect()
    assert alive() is None, "a context copied during the load still holds it"
