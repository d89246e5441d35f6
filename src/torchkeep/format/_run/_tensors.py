"""A checkpoint's tensors read from its packs: hash checks, deferred remote fetches, shards."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from torchkeep.errors import CorruptCheckpointError
from torchkeep.format._artifact import SafetensorsFile
from torchkeep.format._deferred import current as current_deferred
from torchkeep.format._hash import hash_matches
from torchkeep.format._location import MapLocation, cast, relocate
from torchkeep.format._rebuild import rebuild
from torchkeep.format._run._manifest import Manifest
from torchkeep.format._sharded import assemble


def load_state(
    find_pack: Callable[[str, Manifest, str], Path],
    manifest: Manifest,
    *,
    map_location: MapLocation,
    dtype: torch.dtype | None,
    verify: bool,
    shards: bool = True,
) -> Any:
    """The saved state of ``manifest``, its tensors mapped from the packs ``find_pack`` finds
    (:meth:`RunReader.load`, which turns a pruned checkpoint's errors into
    ``CheckpointPrunedError``)."""
    packs: dict[str, SafetensorsFile] = {}
    fetched: set[tuple[str, str]] = set()
    source = str(manifest.path)
    deferred = current_deferred()  # a caller that will choose the tensors it uses
    by_pack: dict[str, list[str]] = {}

    def opened(name: str, pack: SafetensorsFile) -> SafetensorsFile:
        if pack.mapped.lazy and deferred is None:  # a remote pack read whole: all in flight
            for ref in manifest.tensors.values() if not by_pack else ():
                by_pack.setdefault(ref.pack, []).append(ref.key)
            pack.prefetch(by_pack.get(name, ()))
        return pack

    def damaged(key: str, pack: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"tensor {key!r} does not match its hash: pack {pack} was altered or damaged",
            path=source,
            key=key,
            hint="load another checkpoint of the run (RUN@<step>); "
            "torchkeep verify RUN lists every damaged tensor",
        )

    def fetch(key: str) -> torch.Tensor:
        ref = manifest.tensors.get(key)
        if ref is None:
            raise CorruptCheckpointError(
                f"the skeleton refers to tensor {key!r}, which the manifest does not list",
                path=source,
                key=key,
            )
        if ref.pack not in packs:
            pack_path = find_pack(ref.pack, manifest, key)  # verified per tensor below
            packs[ref.pack] = opened(ref.pack, SafetensorsFile(str(pack_path)))
        pack = packs[ref.pack]
        lazy = deferred is not None and pack.mapped.lazy
        t = pack.tensor(ref.key, fetch=not lazy)
        if tuple(t.shape) != ref.shape or str(t.dtype).removeprefix("torch.") != ref.dtype:
            raise CorruptCheckpointError(
                f"tensor {key!r}: the pack holds {t.dtype} {tuple(t.shape)}, "
                f"the manifest says {ref.dtype} {ref.shape}",
                path=source,
                key=key,
            )
        if lazy and deferred is not None:  # fetched and checked when the caller uses it
            if (ref.pack, ref.key) in fetched:
                return deferred.copy_of(t)  # distinct tensors, as below
            fetched.add((ref.pack, ref.key))
            entry = pack.entry(ref.key)

            def check(t: torch.Tensor, ref: Any = ref, key: str = key) -> None:
                if not hash_matches(t, ref.hash):
                    raise damaged(key, ref.pack)

            deferred.add(t, pack.mapped, entry.start, entry.end, check if verify else None)
            return t
        if verify and (ref.pack, ref.key) not in fetched and not hash_matches(t, ref.hash):
            raise damaged(key, ref.pack)
        if (ref.pack, ref.key) in fetched:
            # Equal bytes are stored once, but distinct tensors must not share memory:
            # an in-place update of one (Adam's step += 1) would change the other.
            return t.clone()
        fetched.add((ref.pack, ref.key))
        return t

    state = rebuild(
        manifest.skeleton,
        fetch,
        map_location=map_location,
        dtype=dtype,
        source=source,
        ready=None if deferred is None else lambda t: deferred.materialize([t]),
    )
    if shards and manifest.sharded is not None and isinstance(state, dict):
        # Saved in shards (FSDP2/DTensor): each full tensor assembled from its chunks. Each
        # chunk is hashed where it lies in its pack, copied into place, and its pages dropped:
        # the peak is the full tensors plus one chunk.
        def chunk(key: str) -> torch.Tensor:  # read now (remote: fetched before the copy)
            t = fetch(key)
            if deferred is not None:
                deferred.materialize([t])
            return t

        def move(t: torch.Tensor) -> torch.Tensor:
            return cast(relocate(t, "cpu", map_location, key="", path=source), dtype)

        def release(key: str, t: torch.Tensor) -> None:
            packs[manifest.tensors[key].pack].mapped.release(t)

        moved = map_location is not None or dtype is not None
        whole = assemble(
            manifest.sharded, chunk, source=source, release=release, finish=move if moved else None
        )
        state.update(whole)
    return state
