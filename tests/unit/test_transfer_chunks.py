"""Chunk planning: unaligned extents, zero runs, resume states."""

from __future__ import annotations

import pytest

from appliance.datapath.chunks import (
    ChunkState,
    ChunkTable,
    ChunkWork,
    DataRun,
    Work,
    ZeroRun,
    measure,
    plan,
)
from appliance.storage.extents import Extent

KIB = 1024
MIB = 1024 * KIB


def chunks_of(item: Work) -> tuple[ChunkWork, ...]:
    assert not isinstance(item, ZeroRun)
    return item.chunks if isinstance(item, DataRun) else (item,)


def test_table_bounds_clip_the_last_chunk() -> None:
    table = ChunkTable(3 * MIB + 5, MIB)
    assert table.count == 4
    assert table.bounds(0) == (0, MIB)
    assert table.bounds(3) == (3 * MIB, 5)


def test_table_keeps_states_and_hashes() -> None:
    table = ChunkTable(4 * MIB, MIB)
    table.set(2, b"\x01" * 16, ChunkState.PENDING)
    assert table.state(2) == ChunkState.PENDING
    assert table.digest(2) == b"\x01" * 16
    assert table.digest(1) is None
    assert not table.complete()
    with pytest.raises(ValueError, match="not every chunk"):
        table.digests()


@pytest.mark.parametrize("start", [0, 1, 4095, MIB - 1, MIB, MIB + 512])
@pytest.mark.parametrize("length", [1, 4096, MIB, MIB + 1, 3 * MIB - 7])
def test_unaligned_data_extent_splits_at_chunk_boundaries(start: int, length: int) -> None:
    size = 8 * MIB + 123
    table = ChunkTable(size, MIB)
    work = list(plan([Extent(start, length)], table))
    chunks = [chunk for item in work for chunk in chunks_of(item)]
    assert [c.index for c in chunks] == list(range(start // MIB, (start + length - 1) // MIB + 1))
    covered = [segment for chunk in chunks for segment in chunk.segments]
    assert covered[0].start == start
    assert sum(segment.length for segment in covered) == length
    for chunk in chunks:
        assert chunk.start == chunk.index * MIB
        for segment in chunk.segments:
            assert chunk.start <= segment.start and segment.end <= chunk.end
        assert chunk.covered == (sum(s.length for s in chunk.segments) == chunk.length)


def test_zero_chunks_merge_into_runs_and_partial_ones_stay_chunks() -> None:
    size = 10 * MIB
    extents = [
        Extent(0, MIB),  # data chunk 0
        Extent(MIB, 4 * MIB + KIB, zero=True, hole=True),  # chunks 1-4 zero, chunk 5 starts zero
        Extent(5 * MIB + KIB, MIB - KIB),  # rest of chunk 5 is data
        Extent(6 * MIB, 4 * MIB, zero=True),  # chunks 6-9 zero
    ]
    work = list(plan(extents, ChunkTable(size, MIB), max_zero_run=2 * MIB))
    kinds = [
        (
            type(item).__name__,
            item.first_index if isinstance(item, ZeroRun) else chunks_of(item)[0].index,
        )
        for item in work
    ]
    assert kinds == [
        ("ChunkWork", 0),
        ("ZeroRun", 1),
        ("ZeroRun", 3),
        ("ChunkWork", 5),
        ("ZeroRun", 6),
        ("ZeroRun", 8),
    ]
    runs = [item for item in work if isinstance(item, ZeroRun)]
    assert all(run.length == 2 * MIB for run in runs)
    mixed = work[3]
    assert isinstance(mixed, ChunkWork)
    assert [(s.zero, s.length) for s in mixed.segments] == [(True, KIB), (False, MIB - KIB)]


def test_durable_chunks_are_skipped_and_pending_ones_carry_their_hash() -> None:
    table = ChunkTable(4 * MIB, MIB)
    table.set(0, b"\x00" * 16, ChunkState.DURABLE)
    table.set(1, b"\x07" * 16, ChunkState.PENDING)
    table.set(2, b"\x08" * 16, ChunkState.PENDING)
    extents = [Extent(0, 2 * MIB), Extent(2 * MIB, 2 * MIB, zero=True)]
    work = list(plan(extents, table))
    assert work[0] == ChunkWork(1, MIB, MIB, (Extent(MIB, MIB),), b"\x07" * 16)
    # A pending zero chunk is verified like a data chunk, not merged into a run.
    assert isinstance(work[1], ChunkWork) and work[1].expected == b"\x08" * 16
    assert work[2] == ZeroRun(3, 3, 3 * MIB, MIB, allocated_bytes=MIB)
    size = measure(extents, table)
    assert (size.chunks, size.bytes, size.done_chunks, size.done_bytes) == (4, 4 * MIB, 1, MIB)
    # Holes are not allocated: they cost a chunk of work and count no bytes.
    holes = [Extent(0, MIB), Extent(MIB, 3 * MIB, zero=True, hole=True)]
    size = measure(holes, ChunkTable(4 * MIB, MIB))
    assert (size.chunks, size.bytes) == (4, MIB)
    assert list(plan(holes, ChunkTable(4 * MIB, MIB)))[1] == ZeroRun(1, 3, MIB, 3 * MIB)


def test_only_given_extents_are_planned() -> None:
    table = ChunkTable(100 * MIB, MIB)
    work = list(plan([Extent(50 * MIB + 10, 20), Extent(7 * MIB, MIB)], table))
    assert [item.index for item in work if isinstance(item, ChunkWork)] == [7, 50]
    assert not work[1].covered if isinstance(work[1], ChunkWork) else False


def test_overlapping_or_oversized_extents_are_rejected() -> None:
    table = ChunkTable(4 * MIB, MIB)
    with pytest.raises(ValueError, match="overlapping"):
        list(plan([Extent(0, 2 * MIB), Extent(MIB, MIB)], table))
    with pytest.raises(ValueError, match="past the disk"):
        list(plan([Extent(3 * MIB, 2 * MIB)], table))


def test_empty_disk_and_empty_map_plan_nothing() -> None:
    assert list(plan([], ChunkTable(0, MIB))) == []
    assert list(plan([], ChunkTable(4 * MIB, MIB))) == []


def test_adjacent_whole_data_chunks_merge_into_data_runs() -> None:
    size = 16 * MIB
    table = ChunkTable(size, MIB)
    table.set(9, b"\x05" * 16, ChunkState.PENDING)
    extents = [
        Extent(0, 6 * MIB),  # chunks 0-5: data, split into runs of at most 4 MiB
        Extent(6 * MIB, MIB, zero=True),  # chunk 6: a zero run breaks the data run
        Extent(7 * MIB, 3 * MIB),  # chunks 7-9; 9 is pending: verified alone
        Extent(10 * MIB, MIB // 2),  # chunk 10: partly covered, alone
        Extent(12 * MIB, 2 * MIB),  # chunks 12-13: not adjacent to 10
    ]
    work = list(plan(extents, table, max_data_run=4 * MIB))
    shape = [
        (type(item).__name__, [c.index for c in chunks_of(item)])
        if not isinstance(item, ZeroRun)
        else ("ZeroRun", list(item.indices))
        for item in work
    ]
    assert shape == [
        ("DataRun", [0, 1, 2, 3]),
        ("DataRun", [4, 5]),
        ("ZeroRun", [6]),
        ("DataRun", [7, 8]),
        ("ChunkWork", [9]),
        ("ChunkWork", [10]),
        ("DataRun", [12, 13]),
    ]
    first = work[0]
    assert isinstance(first, DataRun)
    assert (first.start, first.length, first.end) == (0, 4 * MIB, 4 * MIB)


def test_a_data_run_never_exceeds_its_limit_nor_merges_when_chunks_are_larger() -> None:
    table = ChunkTable(10 * MIB + 5, MIB)
    runs = list(plan([Extent(0, 10 * MIB + 5)], table, max_data_run=3 * MIB))
    assert [len(chunks_of(item)) for item in runs] == [3, 3, 3, 2]
    assert all(chunks_of(item)[-1].end - chunks_of(item)[0].start <= 3 * MIB for item in runs)
    alone = list(plan([Extent(0, 4 * MIB)], ChunkTable(4 * MIB, MIB), max_data_run=MIB))
    assert all(isinstance(item, ChunkWork) for item in alone)
