"""The demo's --data-dir: it never deletes a directory (or files) it did not make."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.demo import DEMO_MARKER, DataDirRefused, prepare_data_dir, run_demo


def _user_dir(tmp_path: Path) -> Path:
    user = tmp_path / "precious"
    (user / "sub").mkdir(parents=True)
    (user / "notes.txt").write_text("keep me")
    (user / "sub" / "data.bin").write_bytes(b"\x01" * 100)
    return user


def test_the_demo_refuses_a_directory_it_did_not_make_and_leaves_it_as_it_was(
    tmp_path: Path,
) -> None:
    user = _user_dir(tmp_path)
    assert run_demo(user) == 2  # refused before anything starts
    assert (user / "notes.txt").read_text() == "keep me"
    assert (user / "sub" / "data.bin").read_bytes() == b"\x01" * 100
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt", "sub"]


def test_a_file_in_place_of_the_directory_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "a-file"
    path.write_text("not a directory")
    with pytest.raises(DataDirRefused):
        prepare_data_dir(path)
    assert path.read_text() == "not a directory"


def test_a_new_directory_is_made_and_marked(tmp_path: Path) -> None:
    fresh = tmp_path / "a" / "b"
    prepare_data_dir(fresh)
    assert [p.name for p in fresh.iterdir()] == [DEMO_MARKER]


def test_an_empty_directory_is_used_and_kept(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare_data_dir(empty)
    assert empty.is_dir() and [p.name for p in empty.iterdir()] == [DEMO_MARKER]


def test_a_directory_the_demo_made_is_emptied_but_not_removed(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    prepare_data_dir(demo)
    (demo / "sites" / "onprem").mkdir(parents=True)
    (demo / "appliance.log").write_text("old run")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "kept").write_text("x")
    (demo / "link").symlink_to(outside, target_is_directory=True)
    inode = demo.stat().st_ino
    prepare_data_dir(demo)
    assert [p.name for p in demo.iterdir()] == [DEMO_MARKER]
    assert demo.stat().st_ino == inode
    assert (outside / "kept").read_text() == "x"  # a symlink is removed, not followed
