"""Block bitmaps: set/clear ranges, runs, unions, and the atomic file format."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.errors import DiskCorrupt
from appliance.storage import bitmap
from appliance.storage.bitmap import Bitmap, int_runs, range_mask, set_runs


def runs_of(bits: set[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for index in sorted(bits):
        if runs and runs[-1][1] == index:
            runs[-1] = (runs[-1][0], index + 1)
        else:
            runs.append((index, index + 1))
    return runs


@pytest.mark.parametrize(
    ("first", "end"),
    [(0, 0), (0, 1), (0, 8), (3, 5), (7, 9), (1, 63), (8, 64), (0, 100), (99, 100), (5, 100)],
)
def test_set_range_sets_exactly_that_range(first: int, end: int) -> None:
    blocks = Bitmap(100)
    blocks.set_range(first, end)
    assert [i for i in range(100) if i in blocks] == list(range(first, end))
    assert blocks.runs() == ([(first, end)] if end > first else [])
    assert blocks.count() == end - first


def test_clear_range_leaves_the_rest() -> None:
    blocks = Bitmap(40)
    blocks.set_range(0, 40)
    blocks.clear_range(3, 29)
    assert blocks.runs() == [(0, 3), (29, 40)]


def test_range_outside_the_map_is_refused() -> None:
    with pytest.raises(ValueError, match="outside"):
        Bitmap(10).set_range(5, 11)


def test_generation_counts_changes() -> None:
    blocks = Bitmap(10)
    blocks.set_range(1, 2)
    blocks.set_range(2, 2)  # empty: no change
    assert blocks.generation == 1


@given(st.sets(st.integers(min_value=0, max_value=299)))
def test_runs_match_a_set_of_indexes(indexes: set[int]) -> None:
    blocks = Bitmap(300)
    for index in indexes:
        blocks.set_range(index, index + 1)
    assert blocks.runs() == runs_of(indexes)
    assert int_runs(blocks.as_int(), 300) == runs_of(indexes)


def test_runs_are_clipped_to_the_bit_count() -> None:
    assert set_runs(b"\xff\xff", 11) == [(0, 11)]
    assert int_runs(range_mask(4, 20), 12) == [(4, 12)]
    assert int_runs(0, 10) == []


def test_update_is_a_union() -> None:
    a, b = Bitmap(20), Bitmap(20)
    a.set_range(0, 3)
    b.set_range(2, 6)
    b.set_range(15, 20)
    a.update(b)
    assert a.runs() == [(0, 6), (15, 20)]


def test_saved_bitmap_loads_back(tmp_path: Path) -> None:
    blocks = Bitmap(1000)
    blocks.set_range(10, 500)
    path = tmp_path / "map"
    bitmap.save(path, blocks.to_bytes(), 1000, 65536)
    assert bitmap.load(path, 65536, 1000).runs() == [(10, 500)]
    assert [p.name for p in tmp_path.iterdir()] == ["map"]  # no temporary left behind


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[:10],  # torn header
        lambda data: data[:-1],  # torn bits
        lambda data: data[:-1] + bytes([data[-1] ^ 1]),  # flipped bit
        lambda data: b"NOTABMAP" + data[8:],
    ],
)
def test_a_damaged_bitmap_is_reported(tmp_path: Path, damage: object) -> None:
    path = tmp_path / "map"
    blocks = Bitmap(64)
    blocks.set_range(0, 33)
    bitmap.save(path, blocks.to_bytes(), 64, 4096)
    assert callable(damage)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DiskCorrupt):
        bitmap.load(path, 4096, 64)


def test_a_bitmap_of_another_geometry_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "map"
    bitmap.save(path, bytes(8), 64, 4096)
    with pytest.raises(DiskCorrupt, match="blocks"):
        bitmap.load(path, 65536, 64)
