"""Statically scan a pickle-based checkpoint file: ``scan_file`` and the zip side of the scan.

Reads the pickles of a ``torch.save`` zip archive (each ``.pkl`` record), of a ``torch.export``
archive (``.pt2``: the members ``torch.export.load`` would unpickle, and compiled code), of the
legacy format (five pickles in a row) or of a bare pickle, and hands them to the opcode walker of
:mod:`._pickle_scan` under one budget per file; the pre-0.4 tar format is refused unscanned.
Archive members are read with a size limit (``MAX_RECORD_BYTES``, against zip bombs), and a zip
with two members of one name is refused: zipfile reads the last, torch the first. The result
is a :class:`PickleScan`, with the globals torch's ``weights_only`` unpickler refuses
(:func:`._pickle_allow.is_allowed_global`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from torchkeep.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    TorchkeepError,
    UnsafeCheckpointError,
)
from torchkeep.format import _pickle_scan  # MAX_RECORD_BYTES, read there on every call
from torchkeep.format._pickle_allow import is_allowed_global
from torchkeep.format._pickle_scan import (
    _HINT_CORRUPT,
    _PARSE_ERRORS,
    _broken,
    _Budget,
    _Malformed,
    _Reader,
    _scan_stream,
)
from torchkeep.format._safe_values import SAFE_VALUE_GLOBALS
from torchkeep.storage import is_url, local_path, storage_error, storage_for

__all__ = [
    "COMPILED_CODE",
    "TAR_FORMAT",
    "ZIP_ERRORS",
    "PickleScan",
    "scan_file",
]

TAR_FORMAT = "<tar format of PyTorch < 0.4>"
COMPILED_CODE = "<compiled code (a shared library)>"
_COMPILED = (".so", ".dll", ".dylib", ".pyd", ".cubin", ".o", ".hsaco", ".spv")
LEGACY_PICKLES = 5  # magic number, protocol version, sys_info, the object, the storage keys
_ZIP_MAGIC = b"PK\x03\x04"
# what zipfile raises on damaged or hostile archives (OSError: seeks to offsets that lie;
# NotImplementedError: a "version needed" above 6.3 or a compression method it lacks, raised by
# ZipFile() itself for any member; RuntimeError: an encrypted member)
ZIP_ERRORS: tuple[type[Exception], ...] = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError)
ZIP_ERRORS += (NotImplementedError, RuntimeError, zlib.error, KeyError, IndexError, *_PARSE_ERRORS)
_ZIP_ERRORS = ZIP_ERRORS


@dataclass(frozen=True, kw_only=True, slots=True)
class PickleScan:
    """What a static scan of a pickle-based file found.

    Attributes:
        path: the file scanned.
        records: the pickles scanned: zip record names (``"archive/data.pkl"``), or
            ``"<pickle 0>"``, ``"<pickle 1>"``... for the legacy format and bare pickles.
        globals: every ``module.qualname`` the file would import, in first-seen order.
        unsafe: those torchkeep refuses to load without ``trust``: refused by torch's
            ``weights_only`` unpickler (:func:`is_allowed_global`) and not rebuilt by torchkeep,
            including :data:`UNRESOLVED` for a ``STACK_GLOBAL`` whose operands are unknown,
            :data:`TAR_FORMAT` for the pre-0.4 tar format (refused by torch, not scanned) and
            :data:`COMPILED_CODE` for a shared library in a ``.pt2`` archive.
        rebuilt: the harmless values torch refuses but torchkeep rebuilds with its own checked
            code (numpy arrays, scalars and dtypes, ``pathlib`` paths, ``torch.__version__``):
            ``tk.load`` reads them without ``trust``; plain ``torch.load(weights_only=True)``
            only inside ``torch.serialization.safe_globals``.
    """

    path: str
    records: tuple[str, ...]
    globals: tuple[str, ...]
    unsafe: tuple[str, ...]
    rebuilt: tuple[str, ...] = ()

    @property
    def is_safe(self) -> bool:
        """Nothing that torchkeep would refuse to load without ``trust``."""
        return not self.unsafe

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "records": list(self.records),
            "globals": list(self.globals),
            "unsafe": list(self.unsafe),
            "rebuilt": list(self.rebuilt),
            "is_safe": self.is_safe,
        }


def _scan_zip(
    f: IO[bytes], path: str, found: dict[str, None], budget: _Budget | None = None
) -> list[str]:
    records: list[str] = []
    budget = budget or _Budget(path)
    try:
        with zipfile.ZipFile(f) as archive:
            _refuse_duplicate_members(archive, path)
            infos = [i for i in archive.infolist() if i.filename.endswith(".pkl")]
            if not infos and any(n.endswith("/archive_format") for n in archive.namelist()):
                return _scan_export_archive(archive, path, found, budget)
            if not infos:
                raise CorruptCheckpointError(
                    "zip archive holds no .pkl record", path=path, hint=_HINT_CORRUPT
                )
            # checked before anything is decompressed, for each record and for all of them;
            # a declared compressed size cannot be more than the archive holds
            size = f.seek(0, io.SEEK_END)
            for info in infos:
                packed = min(info.compress_size, size)
                budget.check_inflation(info.filename, info.file_size, packed)
            total, packed = sum(i.file_size for i in infos), sum(i.compress_size for i in infos)
            budget.check_inflation("the .pkl records", total, min(packed, size))
            for info in infos:
                data = read_member(archive, info.filename, path)
                records.append(info.filename)
                try:  # torch reads one pickle per record and ignores what follows its STOP
                    reader = _Reader(io.BytesIO(data), len(data))
                    _scan_stream(reader, 1, found, [], budget, info.filename)
                except _Malformed as exc:
                    raise _broken(path, info.filename, str(exc), found) from exc
    except TorchkeepError:
        raise
    except _ZIP_ERRORS as exc:
        raise _broken(path, "zip archive", str(exc) or type(exc).__name__, found) from exc
    return records


@contextlib.contextmanager
def open_zip(path: str | os.PathLike[str]) -> Iterator[zipfile.ZipFile]:
    """``zipfile.ZipFile(path)``; a URL's archive is read through its store (ranges)."""
    if not is_url(path):
        with zipfile.ZipFile(path) as archive:
            yield archive
        return
    with storage_for(path).open_read(os.fspath(path)) as f, zipfile.ZipFile(f) as archive:
        yield archive


def _refuse_duplicate_members(archive: zipfile.ZipFile, path: str) -> None:
    """Refuse an archive with two members of one name: zipfile reads the last one (twice, when
    asked for each), torch's own zip reader may read the other, so the scan would not see what
    torch loads. torch.save never writes one."""
    seen: set[str] = set()
    for info in archive.infolist():
        if info.filename in seen:
            raise UnsafeCheckpointError(
                f"the zip archive holds two members named {info.filename!r}; a scan cannot tell "
                "which of them torch would load",
                path=path,
                hint="do not load this file: torch.save never writes duplicate members, and a "
                "second copy is a known way to slip a pickle past scanners",
            )
        seen.add(info.filename)


def read_member(archive: zipfile.ZipFile, name: str, path: str) -> bytes:
    """The bytes of one archive member, refusing one that declares more than
    :data:`MAX_RECORD_BYTES` (a zip bomb)."""
    info = archive.getinfo(name)
    if info.file_size > _pickle_scan.MAX_RECORD_BYTES:
        raise CorruptCheckpointError(
            f"{name} declares {info.file_size} bytes uncompressed, over "
            f"the {_pickle_scan.MAX_RECORD_BYTES >> 20} MiB limit (a zip bomb?)",
            path=path,
            hint=_HINT_CORRUPT,
        )
    with archive.open(info) as member:  # zipfile stops at the declared size
        return member.read(_pickle_scan.MAX_RECORD_BYTES)


def is_compiled_code(name: str) -> bool:
    """An archive member that is a shared library or AOTInductor output: loading runs it."""
    return name.endswith(_COMPILED) or "/data/aotinductor/" in name


def _scan_export_archive(
    archive: zipfile.ZipFile, path: str, found: dict[str, None], budget: _Budget
) -> list[str]:
    """A ``torch.export`` archive (``.pt2``): the pickles ``torch.export.load`` would unpickle
    (sample inputs, tensors and objects its payload tables mark as pickled) and compiled code."""
    records: list[str] = []
    names = archive.namelist()
    pickled: list[str] = []
    for name in names:
        base = name.rsplit("/", 1)[-1]
        if is_compiled_code(name):
            found[COMPILED_CODE] = None
            records.append(name)
        elif "/data/sample_inputs/" in name or (
            "/data/constants/" in name and base.startswith(("custom_obj", "opaque_obj"))
        ):
            pickled.append(name)
        elif base.endswith(("_weights_config.json", "_constants_config.json")):
            try:
                table = json.loads(read_member(archive, name, path))["config"].values()
                directory = name.rsplit("/", 1)[0]
                pickled += [f"{directory}/{e['path_name']}" for e in table if e.get("use_pickle")]
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise _broken(path, name, f"not a payload table ({exc})", found) from exc
    for name in dict.fromkeys(pickled):
        if name not in names:
            continue
        info = archive.getinfo(name)
        budget.check_inflation(name, info.file_size, info.compress_size)
        data = read_member(archive, name, path)
        if data.startswith(_ZIP_MAGIC):  # torch.save bytes inside the archive
            inner = _scan_zip(io.BytesIO(data), f"{path}:{name}", found, budget)
            records += [f"{name}:{r}" for r in inner]
        elif data:
            try:
                _scan_stream(_Reader(io.BytesIO(data), len(data)), 1, found, [], budget, name)
            except _Malformed as exc:
                raise _broken(path, name, str(exc), found) from exc
            records.append(name)
    return records


def _is_tar(f: IO[bytes]) -> bool:
    # torch.load tries the pre-0.4 tar format first on any non-zip file; mirror its test
    try:
        with tarfile.open(fileobj=f, mode="r:"):
            return True
    except (tarfile.TarError, *_PARSE_ERRORS, UnicodeError):
        return False
    finally:
        f.seek(0)


def scan_file(path: str | os.PathLike[str]) -> PickleScan:
    """Statically scan a ``torch.save`` file (zip or legacy) or a bare pickle.

    Raises:
        CheckpointNotFoundError: nothing at ``path``.
        UnsafeCheckpointError: a pickle breaks off after importing a refused global.
        CorruptCheckpointError: not a file, empty, or not parseable as the format it claims.
        StorageError: the file exists but cannot be read.
    """
    p = os.fspath(path)
    try:
        mode = local_path(p).stat().st_mode  # a URL's stat asks its store
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointNotFoundError(
            f"no file at {p}", path=p, hint="check the path and the working directory"
        ) from None
    except OSError as exc:
        raise storage_error(exc, p, "stat the file") from exc
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise CorruptCheckpointError(
            f"{p} is {kind}, not a pickle-based checkpoint",
            path=p,
            hint="pass the checkpoint file itself",
        )
    found: dict[str, None] = {}
    try:
        with storage_for(p).open_read(p) as f:
            head = f.read(len(_ZIP_MAGIC))
            if not head:
                raise CorruptCheckpointError("the file is empty", path=p, hint=_HINT_CORRUPT)
            f.seek(0)
            if head == _ZIP_MAGIC:
                records = _scan_zip(f, p, found)
            elif _is_tar(f):  # weights_only refuses this format outright; not scanned
                records, found[TAR_FORMAT] = ["<tar archive>"], None
            else:  # legacy torch format (five pickles, then raw bytes) or a bare pickle
                records = []
                reader = _Reader(f, storage_for(p).size(p))
                try:
                    _scan_stream(reader, LEGACY_PICKLES, found, records, _Budget(p))
                except _Malformed as exc:
                    raise _broken(p, records[-1], str(exc), found) from exc
    except TorchkeepError:
        raise
    except OSError as exc:
        raise storage_error(exc, p, "read the file") from exc
    refused = [g for g in found if not is_allowed_global(g)]
    rebuilt = tuple(g for g in refused if g in SAFE_VALUE_GLOBALS)
    unsafe = [g for g in refused if g not in SAFE_VALUE_GLOBALS]
    if rebuilt and not unsafe:
        # Rebuilding is only offered to files whose _codecs calls are the ones pickle writes
        from torchkeep.format._pickle_codecs import check_codecs  # it imports this module

        try:
            check_codecs(p, zip_format=head == _ZIP_MAGIC)
        except UnsafeCheckpointError:
            unsafe.append("_codecs.encode")
    return PickleScan(
        path=p,
        records=tuple(records),
        globals=tuple(found),
        unsafe=tuple(unsafe),
        rebuilt=rebuilt,
    )
