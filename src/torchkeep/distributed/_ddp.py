"""DDP saves: every rank calls ``save``; rank 0 commits one manifest holding every rank's state.

The protocol of one save at step N (W ranks, see ``docs/architecture.md``):

1. every rank splits its app into shared entries (model, optimizer: the same on every rank) and
   per-rank ones (``_ranks.py``);
2. each rank r > 0 writes its per-rank tensors into a pack of its own (temp file, fsync, rename),
   then posts their table (skeleton, tensor refs with hashes, the pack's digest) to the store;
3. rank 0 captures the shared entries (models unwrapped) and its own per-rank ones, waits for
   the posts of every other rank (up to ``barrier_timeout``: a missing rank is named), writes
   its pack, then the manifest, which lists every rank's tensors: the single commit point;
4. rank 0 applies retention, then posts the outcome; the other ranks' ``save`` returns (or
   raises rank 0's error) once it is posted.

A rank that dies before 2 leaves no commit: rank 0 raises :class:`DistributedError` naming it,
the other ranks raise rank 0's error, and the packs written are unreferenced, swept by the next
writer. With ``async_save`` the waiting (3, 4) runs on the background thread of each rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import torch

from torchkeep.distributed._group import RankGroup, current_group
from torchkeep.distributed._ranks import (
    RANKS_KEY,
    RankStatePolicy,
    check_policy,
    rank_keys,
    restore_ranked,
    unwrapped,
)
from torchkeep.distributed._sharded import Hashes, merge, restore_shards, save_shards, sharded_keys
from torchkeep.errors import DistributedError, InvalidArgumentError, StorageError, TorchkeepError
from torchkeep.format import (
    PACK_DIR,
    Flattened,
    HashingWriter,
    Manifest,
    RunReader,
    TensorRef,
    flatten,
    pack_name,
    tensor_hash,
    write_pack,
)
from torchkeep.format._dtypes import dtype_name
from torchkeep.format._run._manifest import _tensor_ref
from torchkeep.state import capture_app
from torchkeep.storage import storage_for

T = TypeVar("T")
Extra = tuple[dict[str, TensorRef], dict[str, tuple[int, str]]]
"""Tensors and packs written by the other ranks, for rank 0's manifest."""


class RankedRun:
    """One manager's view of the job's ranks: meeting points, per-rank state, who commits."""

    def __init__(
        self,
        root: Path,
        *,
        timeout: float | None,
        per_rank: Iterable[str],
        rank_state: str,
        read_only: bool = False,
        alone: bool = False,
    ) -> None:
        self.root = root
        # A read-only manager meets no one: it knows its rank (for restore) but never waits.
        self.group: RankGroup = current_group(str(root), timeout, meet=not read_only, alone=alone)
        self.per_rank = tuple(per_rank)
        self.rank_state = check_policy(rank_state)
        self._alone = alone
        self._open_key = self.group.next_key("open") if self.group.distributed else ""
        if self.group.distributed:
            self.group.announce()
        self._save_key = ""
        # This save's shards (rank 0): what writes them (or has), for the commit.
        self._shards: Callable[[], dict[str, Any]] | None = None

    @property
    def writer(self) -> bool:
        """Whether this process commits: rank 0, or a process outside a distributed job."""
        return self.group.writer

    # -- opening --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def opening(self) -> Iterator[None]:
        """Rank 0 opens the run inside this block; then the others may read it (or its error)."""
        try:
            yield
        except BaseException as exc:
            if self.group.distributed:
                with contextlib.suppress(TorchkeepError):
                    self.group.post(self._open_key, {"error": _text(exc)})
            raise
        if self.group.distributed:
            self.group.post(self._open_key, {})

    def wait_opened(self) -> None:
        """Ranks > 0: wait until rank 0 has created and locked the run (no reader race)."""
        self.group.gather(self._open_key, [0], "at the run's opening (rank 0 creates the run)")

    def closing(self) -> None:
        """Every rank arrives; rank 0 waits for all, so that its store outlives their reads.

        Not after a failed meeting: the rank missing then would be waited for in vain."""
        if not self.group.distributed or self.group.broken:
            return
        key = self.group.next_key("close")
        self.group.post(key, {})
        if self.group.writer:
            self.group.gather(key, list(range(1, self.group.world_size)), "at close()")

    # -- restoring ------------------------------------------------------------------------------

    def restore(
        self,
        app: Any,
        state: Mapping[str, Any],
        *,
        strict: bool,
        source: str,
        rank_state: str | None,
        manifest: Manifest | None = None,
        reader: RunReader | None = None,
        verify: bool = True,
    ) -> dict[str, Any]:
        """Restore this rank's view of ``state``; a sharded checkpoint's models and optimizers
        through DCP (resharded to this world size), from ``manifest`` of ``reader``."""
        policy: RankStatePolicy = (
            self.rank_state if rank_state is None else check_policy(rank_state)
        )
        shards: list[str] = []
        if manifest is not None and manifest.sharded is not None and reader is not None:
            shards = restore_shards(reader, manifest, app, verify=verify)
        values = restore_ranked(
            {k: v for k, v in app.items() if k not in shards},
            state,
            rank=self.group.rank,
            world_size=self.group.world_size,
            policy=policy,
            per_rank=self.per_rank,
            strict=strict,
            source=source,
        )
        for key, value in values.items():  # plain values go back into the caller's app
            if key in app:
                app[key] = value
        return values

    # -- saving ---------------------------------------------------------------------------------

    def capture(
        self,
        app: Mapping[str, Any],
        step: int,
        hashes: Hashes | None = None,
        *,
        defer: bool = False,
    ) -> dict[str, Any]:
        """Rank 0's state: the shared entries, and under ``__torchkeep_ranks__`` its own.

        Sharded entries go through DCP; with ``defer`` (async saves) they are only staged here
        and written by the commit, on the background thread.

        In a job, a failure here is posted to the other ranks, which raise it at once.
        """
        app = unwrapped(app)  # DDP's model is saved as the model inside, without "module."
        sharded = sharded_keys(app)
        self._shards = None
        digests = hashes or _hashes
        if not self.group.distributed:
            if not sharded:
                return capture_app(app)
            if self._alone and _job_size() > 1:
                raise InvalidArgumentError(
                    f"the sharded entries {', '.join(map(repr, sharded))} span the job's "
                    "ranks, so one rank cannot save them alone (distributed=False)",
                    key=sharded[0],
                    hint="build the CheckpointManager on every rank without distributed=False",
                )
            self._shards = save_shards(self.root, step, 0, app, sharded, digests, defer=defer)
            return capture_app({k: v for k, v in app.items() if k not in sharded})
        self._save_key = key = self.group.next_key(f"save-{step}")
        try:
            if sharded:  # every rank writes its shards (deferred: stages them) before the commit
                self._shards = save_shards(self.root, step, 0, app, sharded, digests, defer=defer)
                app = {k: v for k, v in app.items() if k not in sharded}
            local = rank_keys(app, self.per_rank)
            state = capture_app({k: v for k, v in app.items() if k not in local})
            own = capture_app({k: app[k] for k in local})
            state[RANKS_KEY] = {"world_size": self.group.world_size, "keys": local, "0": own}
            flatten(state)  # an unstorable value fails here, where the other ranks hear of it
        except BaseException as exc:
            with contextlib.suppress(TorchkeepError):
                self.group.post(f"{key}/commit", {"error": _text(exc)})
            raise
        return state

    def committing(self, write: Callable[..., T], step: int) -> Callable[..., T]:
        """Rank 0's ``write``, which first takes in the other ranks' parts and posts the outcome."""
        shards, self._shards = self._shards, None
        if not self.group.distributed:
            if shards is None:
                return write

            def commit_one(step: int, flat: Flattened, *args: Any, **kwargs: Any) -> T:
                doc, tensors, packs = merge([shards()])
                extra = _extra(tensors, packs)
                return write(step, flat, *args, extra=extra, sharded=doc, **kwargs)

            return commit_one
        key = self._save_key  # taken by capture(), on the caller's thread, in save order
        others = list(range(1, self.group.world_size))

        def commit(step: int, flat: Flattened, *args: Any, **kwargs: Any) -> T:
            try:
                own = shards() if shards is not None else None  # this rank's, written now
                parts = self.group.gather(key, others, f"with its part of step {step}")
                flat, extra = _merge(flat, parts, step)
                if own is not None:
                    doc, tensors, packs = merge([own] + [parts[r]["sharded"] for r in others])
                    more = _extra(tensors, packs)
                    extra[0].update(more[0])
                    extra[1].update(more[1])
                    kwargs["sharded"] = doc
                result = write(step, flat, *args, extra=extra, **kwargs)
            except BaseException as exc:
                with contextlib.suppress(TorchkeepError):
                    self.group.post(f"{key}/commit", {"error": _text(exc)})
                raise
            self.group.post(f"{key}/commit", {"step": step})
            return result

        return commit

    def save_part(
        self,
        step: int,
        app: Mapping[str, Any],
        hashes: Callable[[dict[str, torch.Tensor]], dict[str, str]],
        record: Callable[[Manifest, tuple[str, ...]], T],
        *,
        defer: bool = False,
    ) -> Callable[[], T]:
        """Ranks > 0: write this rank's per-rank state and post it; return the wait for the
        commit, which gives ``record(manifest, ())``."""
        key = self.group.next_key(f"save-{step}")
        rank = self.group.rank
        shards: Callable[[], dict[str, Any]] | None = None
        try:
            app = unwrapped(app)
            sharded = sharded_keys(app)
            defer = defer and bool(sharded)  # only shards are staged; the rest written now
            if sharded:  # this rank's shards, in a pack of its own (deferred: staged)
                shards = save_shards(self.root, step, rank, app, sharded, hashes, defer=defer)
                app = {k: v for k, v in app.items() if k not in sharded}
            local = rank_keys(app, self.per_rank)
            flat = flatten({RANKS_KEY: {str(rank): capture_app({k: app[k] for k in local})}})
        except BaseException as exc:
            with contextlib.suppress(TorchkeepError):
                self.group.post(key, {"error": _text(exc)})
            raise

        def part() -> None:
            try:
                got = shards() if shards is not None else None
                refs, packs = _write_part(self.root, step, flat, hashes)
                skeleton = flat.skeleton["v"][RANKS_KEY]["v"][str(rank)]
            except BaseException as exc:
                with contextlib.suppress(TorchkeepError):
                    self.group.post(key, {"error": _text(exc)})
                raise
            self.group.post(
                key,
                {
                    "step": step,
                    "skeleton": skeleton,
                    "tensors": {k: _ref_fields(r) for k, r in refs.items()},
                    "packs": {name: [n, h] for name, (n, h) in packs.items()},
                    "sharded": got,
                },
            )

        if not defer:
            part()

        def wait_commit() -> T:
            if defer:  # an async save: this rank's shards are written here, in the background
                part()
            self.group.gather(f"{key}/commit", [0], f"with the commit of step {step}")
            return record(RunReader(self.root).manifest(step), ())

        return wait_commit


def _write_part(
    root: Path,
    step: int,
    flat: Flattened,
    hashes: Callable[[dict[str, torch.Tensor]], dict[str, str]],
) -> Extra:
    """Write one rank's tensors into a pack of its own; their refs and the pack's digest."""
    if not flat.tensors:
        return {}, {}
    digests = hashes(flat.tensors)
    pack = pack_name(step)
    path = root / PACK_DIR / pack
    packs: dict[str, tuple[int, str]] = {}

    def write(f: BinaryIO) -> None:
        hashing = HashingWriter(f)
        write_pack(hashing, flat.tensors)  # type: ignore[arg-type]  # only write() is called
        packs[pack] = (hashing.nbytes, hashing.digest)

    try:
        storage_for(path).write_atomic(str(path), write)
    except StorageError:
        with contextlib.suppress(OSError):
            storage_for(path).delete(str(path))
        raise
    refs = {
        key: TensorRef(
            pack=pack,
            key=key,
            dtype=dtype_name(t.dtype),
            shape=tuple(t.shape),
            nbytes=t.numel() * t.element_size(),
            hash=digests[key] if key in digests else tensor_hash(t),
        )
        for key, t in flat.tensors.items()
    }
    return refs, packs


def _merge(flat: Flattened, parts: dict[int, dict[str, Any]], step: int) -> tuple[Flattened, Extra]:
    """Rank 0's flattened state with the other ranks' skeletons; their tensors as extras."""
    block = flat.skeleton["v"][RANKS_KEY]["v"]
    refs: dict[str, TensorRef] = {}
    packs: dict[str, tuple[int, str]] = {}
    for rank, part in sorted(parts.items()):
        if part.get("step") != step:
            raise DistributedError(
                f"rank {rank} saved step {part.get('step')} while rank 0 saved step {step}",
                key=f"rank {rank}",
                hint="every rank must call save() with the same steps, in the same order",
            )
        block[str(rank)] = part["skeleton"]
        where = Path(f"rank {rank}")
        refs.update({k: _tensor_ref(where, k, v) for k, v in part["tensors"].items()})
        packs.update({name: (int(n), str(h)) for name, (n, h) in part["packs"].items()})
    return Flattened(skeleton=flat.skeleton, tensors=flat.tensors), (refs, packs)


def _extra(tensors: dict[str, Any], packs: dict[str, Any]) -> Extra:
    where = Path("sharded part")
    return (
        {k: _tensor_ref(where, k, v) for k, v in tensors.items()},
        {name: (int(n), str(h)) for name, (n, h) in packs.items()},
    )


def _hashes(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    return {k: tensor_hash(t) for k, t in tensors.items()}


def _ref_fields(ref: TensorRef) -> dict[str, Any]:
    return {
        "pack": ref.pack,
        "key": ref.key,
        "dtype": ref.dtype,
        "shape": list(ref.shape),
        "nbytes": ref.nbytes,
        "hash": ref.hash,
    }


def _text(exc: BaseException) -> str:
    text = exc.message if isinstance(exc, TorchkeepError) else str(exc)
    return f"{type(exc).__name__}: {text}"[:2000] or type(exc).__name__


def _job_size() -> int:
    """The world size of the ``torch.distributed`` job around this process (1 outside one)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
