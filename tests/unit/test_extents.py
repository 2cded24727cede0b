"""Extent arithmetic: merging, clipping, splitting, gap filling and chunk math."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.storage.extents import (
    Extent,
    chunk_count,
    chunk_indexes,
    chunk_span,
    clip,
    data_length,
    fill_gaps,
    iter_chunks,
    merge,
    split,
    split_at_chunks,
)

MiB = 1024 * 1024
DATA = Extent


def ZERO(start: int, length: int) -> Extent:
    return Extent(start, length, zero=True)


def HOLE(start: int, length: int) -> Extent:
    return Extent(start, length, zero=True, hole=True)


def test_extent_rejects_negative_values_and_holes_that_are_not_zero() -> None:
    with pytest.raises(ValueError):
        Extent(-1, 10)
    with pytest.raises(ValueError):
        Extent(0, -10)
    with pytest.raises(ValueError):
        Extent(0, 10, hole=True)


def test_merge_joins_adjacent_extents_of_the_same_state_only() -> None:
    extents = [DATA(0, 10), DATA(10, 5), HOLE(15, 5), HOLE(20, 5), ZERO(25, 5), DATA(30, 1)]
    assert merge(extents) == [DATA(0, 15), HOLE(15, 10), ZERO(25, 5), DATA(30, 1)]


def test_merge_keeps_a_gap_between_extents_of_the_same_state() -> None:
    assert merge([DATA(0, 10), DATA(20, 10)]) == [DATA(0, 10), DATA(20, 10)]


def test_merge_drops_empty_extents_and_handles_empty_maps() -> None:
    assert merge([]) == []
    assert merge([DATA(0, 0), DATA(0, 4), DATA(4, 0), DATA(4, 4)]) == [DATA(0, 8)]


@pytest.mark.parametrize(
    "extents",
    [[DATA(10, 10), DATA(0, 10)], [DATA(0, 10), HOLE(5, 10)]],
    ids=["unsorted", "overlap"],
)
def test_merge_rejects_unsorted_or_overlapping_maps(extents: list[Extent]) -> None:
    with pytest.raises(ValueError):
        merge(extents)


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [
        (0, 30, [DATA(0, 10), HOLE(10, 10), DATA(20, 10)]),
        (5, 25, [DATA(5, 5), HOLE(10, 10), DATA(20, 5)]),
        (11, 13, [HOLE(11, 2)]),
        (10, 20, [HOLE(10, 10)]),
        (30, 40, []),
        (7, 7, []),
    ],
)
def test_clip_keeps_only_what_lies_inside_the_range(
    start: int, end: int, expected: list[Extent]
) -> None:
    assert clip([DATA(0, 10), HOLE(10, 10), DATA(20, 10)], start, end) == expected


def test_clip_rejects_a_backwards_range() -> None:
    with pytest.raises(ValueError):
        clip([DATA(0, 10)], 5, 4)


def test_fill_gaps_covers_the_range_exactly_with_data_where_nothing_was_said() -> None:
    filled = fill_gaps([HOLE(10, 10), ZERO(30, 5)], 3, 40)
    assert filled == [DATA(3, 7), HOLE(10, 10), DATA(20, 10), ZERO(30, 5), DATA(35, 5)]
    assert fill_gaps([], 0, 8) == [DATA(0, 8)]
    assert fill_gaps([], 8, 8) == []


def test_split_cuts_extents_into_pieces_no_longer_than_the_limit() -> None:
    pieces = list(split([DATA(3, 10), HOLE(13, 4)], 4))
    assert pieces == [DATA(3, 4), DATA(7, 4), DATA(11, 2), HOLE(13, 4)]
    with pytest.raises(ValueError):
        list(split([DATA(0, 1)], 0))


@pytest.mark.parametrize("start", [0, 1, 511, 4096, MiB - 1, MiB, MiB + 7])
def test_split_at_chunks_never_crosses_a_chunk_boundary_at_any_alignment(start: int) -> None:
    extent = DATA(start, 3 * MiB + 5)
    pieces = list(split_at_chunks([extent], MiB))
    assert sum(piece.length for piece in pieces) == extent.length
    assert pieces[0].start == start and pieces[-1].end == extent.end
    for piece in pieces:
        assert piece.start // MiB == (piece.end - 1) // MiB
    assert merge(pieces) == [extent]


def test_chunk_count_and_spans_of_a_disk_with_a_short_last_chunk() -> None:
    size = 2 * MiB + 100
    assert chunk_count(size, MiB) == 3
    assert chunk_span(0, MiB, size) == (0, MiB)
    assert chunk_span(2, MiB, size) == (2 * MiB, 100)
    with pytest.raises(ValueError):
        chunk_span(3, MiB, size)


def test_empty_disk_has_no_chunks() -> None:
    assert chunk_count(0, MiB) == 0
    assert chunk_indexes(0, 0, MiB) == range(0)
    assert list(iter_chunks([], MiB)) == []
    with pytest.raises(ValueError):
        chunk_span(0, MiB, 0)


@pytest.mark.parametrize(
    ("start", "length", "expected"),
    [
        (0, MiB, range(1)),
        (0, MiB + 1, range(2)),
        (MiB - 1, 2, range(2)),
        (5 * MiB + 3, 1, range(5, 6)),
        (7, 0, range(0)),
    ],
)
def test_chunk_indexes_lists_every_chunk_a_range_touches(
    start: int, length: int, expected: range
) -> None:
    assert chunk_indexes(start, length, MiB) == expected


def test_iter_chunks_groups_the_extents_of_each_chunk() -> None:
    extents = [DATA(0, MiB + 10), HOLE(MiB + 10, MiB - 10), DATA(3 * MiB, 5)]
    chunks = list(iter_chunks(extents, MiB))
    assert chunks == [
        (0, [DATA(0, MiB)]),
        (1, [DATA(MiB, 10), HOLE(MiB + 10, MiB - 10)]),
        (3, [DATA(3 * MiB, 5)]),
    ]


def test_full_disk_is_one_data_extent_and_all_data() -> None:
    size = 4 * MiB
    extents = fill_gaps([], 0, size)
    assert extents == [DATA(0, size)]
    assert data_length(extents) == size
    assert [index for index, _ in iter_chunks(extents, MiB)] == [0, 1, 2, 3]


def test_data_length_counts_only_extents_that_must_be_read() -> None:
    assert data_length([DATA(0, 10), ZERO(10, 5), HOLE(15, 5), DATA(20, 1)]) == 11


@st.composite
def extent_maps(draw: st.DrawFn) -> list[Extent]:
    """Sorted, non-overlapping maps with random gaps, states and unaligned edges."""
    extents = []
    pos = draw(st.integers(0, 3 * MiB))
    for _ in range(draw(st.integers(0, 12))):
        pos += draw(st.sampled_from([0, 0, 1, 511, 4096, 100_000]))
        length = draw(st.integers(1, 3 * MiB))
        zero = draw(st.booleans())
        extents.append(Extent(pos, length, zero=zero, hole=zero and draw(st.booleans())))
        pos += length
    return extents


@given(extent_maps(), st.sampled_from([512, 4096, 65536, MiB]))
def test_splitting_then_merging_gives_back_the_merged_map(
    extents: list[Extent], chunk_size: int
) -> None:
    assert merge(split_at_chunks(extents, chunk_size)) == merge(extents)
    assert merge(split(extents, chunk_size)) == merge(extents)


@given(extent_maps(), st.integers(0, 8 * MiB), st.integers(0, 8 * MiB))
def test_fill_gaps_always_covers_the_range_without_overlap(
    extents: list[Extent], a: int, b: int
) -> None:
    start, end = min(a, b), max(a, b)
    filled = fill_gaps(extents, start, end)
    assert sum(extent.length for extent in filled) == end - start
    pos = start
    for extent in filled:
        assert extent.start == pos
        pos = extent.end
    assert data_length(filled) >= data_length(clip(extents, start, end))
