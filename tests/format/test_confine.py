"""``lstat_inside``: every component below a run's root is checked, not only the last one."""

from __future__ import annotations

from pathlib import Path

import pytest

import torchkeep as tk
from torchkeep.format._confine import lstat_inside, open_folder


def test_every_component_below_the_root_is_checked(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "inner").mkdir(parents=True)
    (outside / "inner" / "f").write_bytes(b"x")
    root = tmp_path / "root"
    root.mkdir()
    (root / "a").symlink_to(outside, target_is_directory=True)
    with pytest.raises(tk.CorruptCheckpointError, match="a is a symbolic link") as info:
        lstat_inside(root, "a", "inner", "f", kind="file")  # the last component is a real file
    assert info.value.key == "a"
    with pytest.raises(tk.CorruptCheckpointError, match="a is a symbolic link"):
        open_folder(root, "a")


def test_names_cannot_climb_and_kinds_are_checked(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_bytes(b"x")
    for name in ("..", ".", "", "a/b"):
        with pytest.raises(tk.CorruptCheckpointError, match="not a plain name"):
            lstat_inside(tmp_path, name, kind="file")
    with pytest.raises(tk.CorruptCheckpointError, match="not a regular file"):
        lstat_inside(tmp_path, "d", kind="file")
    with pytest.raises(tk.CorruptCheckpointError, match="not a directory"):
        lstat_inside(tmp_path, "f", kind="dir")
    assert lstat_inside(tmp_path, "missing", "deeper", kind="file") is None
    assert lstat_inside(tmp_path, "f", kind="file") is not None
    # A link at the root itself is the user's choice (runs/ on another disk): followed.
    (tmp_path / "root_link").symlink_to(tmp_path / "d", target_is_directory=True)
    assert lstat_inside(tmp_path / "root_link", "x", kind="file") is None
