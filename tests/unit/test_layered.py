"""LayeredDisk I/O: reads and writes at any offset, across layers, extents, errors, concurrency."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from appliance.errors import DiskCorrupt, DiskInUse, UnknownSnapshot
from appliance.storage.backend import Backend
from appliance.storage.extents import Extent
from appliance.storage.layered import LayeredDisk

G = 64 * 1024
SIZE = 16 * G + 12345  # the last block is short


def pattern(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


@pytest.fixture
async def disk(tmp_path: Path) -> AsyncIterator[LayeredDisk]:
    async with await LayeredDisk.create(tmp_path / "disk", SIZE, granularity=G) as opened:
        yield opened


async def fill(view: Backend, seed: int) -> bytearray:
    content = pattern(seed, view.size)
    await view.write(0, content)
    return bytearray(content)


def assert_covers(extents: list[Extent], start: int, end: int) -> None:
    position = start
    for extent in extents:
        assert extent.start == position and extent.length > 0
        position = extent.end
    assert position == end
    for a, b in itertools.pairwise(extents):
        assert (a.zero, a.hole) != (b.zero, b.hole), "adjacent equal extents must be merged"


async def test_views_implement_the_backend_protocol(disk: LayeredDisk) -> None:
    snapshot = await disk.snapshot("s")
    assert isinstance(disk.active(), Backend)
    assert isinstance(disk.at(snapshot.id), Backend)
    assert not disk.active().readonly and disk.at(snapshot.id).readonly
    assert disk.active().size == disk.at(snapshot.id).size == SIZE


async def test_a_new_disk_is_one_hole(disk: LayeredDisk) -> None:
    assert await disk.active().extents() == [Extent(0, SIZE, zero=True, hole=True)]
    assert await disk.active().read(SIZE - 100, 100) == bytes(100)


OFFSETS = [0, 1, 511, 4096, 65535, G, G + 1, 2 * G - 1, 3 * G + 17, SIZE - 1]
LENGTHS = [1, 512, G - 1, G, G + 1, 3 * G + 7]


@pytest.mark.parametrize("snapshot_first", [False, True], ids=["base", "overlay"])
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("offset", OFFSETS)
async def test_unaligned_write_reads_back_and_spares_neighbours(
    disk: LayeredDisk, offset: int, length: int, snapshot_first: bool
) -> None:
    length = min(length, SIZE - offset)
    view = disk.active()
    model = await fill(view, 1)
    snapshot = await disk.snapshot("before") if snapshot_first else None
    data = pattern(2, length)
    await view.write(offset, data)
    model[offset : offset + length] = data
    assert await view.read(0, SIZE) == model
    assert await view.read(offset, length) == data
    if snapshot is not None:
        assert await disk.at(snapshot.id).read(0, SIZE) == pattern(1, SIZE)


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("punch_hole", [False, True])
async def test_unaligned_zero_in_an_overlay(
    disk: LayeredDisk, offset: int, punch_hole: bool
) -> None:
    view = disk.active()
    model = await fill(view, 3)
    await disk.snapshot("before")
    length = min(5 * G + 3, SIZE - offset)
    await view.zero(offset, length, punch_hole=punch_hole)
    model[offset : offset + length] = bytes(length)
    assert await view.read(0, SIZE) == model
    extents = await view.extents()
    assert_covers(extents, 0, SIZE)
    for extent in extents:
        if extent.zero:
            assert model[extent.start : extent.end] == bytes(extent.length)


async def test_zeroed_blocks_map_as_zero_not_data(disk: LayeredDisk) -> None:
    view = disk.active()
    await fill(view, 4)
    await view.zero(2 * G, 3 * G)
    extents = await view.extents()
    assert Extent(2 * G, 3 * G, zero=True) in extents  # base: allocated zeroes
    await disk.snapshot("s")
    await view.zero(8 * G, 2 * G, punch_hole=True)
    assert Extent(8 * G, 2 * G, zero=True) in await view.extents()  # overlay must shadow
    await view.write(8 * G, b"x")
    [written] = [e for e in await view.extents() if e.start <= 8 * G < e.end]
    assert written.data


async def test_base_punched_hole_is_a_hole(disk: LayeredDisk) -> None:
    view = disk.active()
    await fill(view, 5)
    await view.zero(G, 2 * G, punch_hole=True)
    assert Extent(G, 2 * G, zero=True, hole=True) in await view.extents()


async def test_extents_of_a_sub_range_cover_it_exactly(disk: LayeredDisk) -> None:
    view = disk.active()
    await view.write(G + 100, pattern(6, 5000))
    await disk.snapshot("s")
    await view.write(5 * G, pattern(7, 2 * G))
    await view.zero(9 * G, G)
    for start, end in [(0, SIZE), (1, SIZE - 1), (G + 5000, 9 * G + 1), (SIZE - 7, SIZE)]:
        extents = await view.extents(start, end - start)
        assert_covers(extents, start, end)
    assert await view.extents(5, 0) == []


async def test_writes_spanning_layers_read_from_each(disk: LayeredDisk) -> None:
    view = disk.active()
    model = bytearray(SIZE)
    for step in range(4):
        offset, data = step * G + G // 2, pattern(10 + step, 2 * G)
        await view.write(offset, data)
        model[offset : offset + len(data)] = data
        await disk.snapshot(f"s{step}")
    assert await view.read(0, SIZE) == model
    assert await view.read(G // 2 + 7, 3 * G) == model[G // 2 + 7 : G // 2 + 7 + 3 * G]


async def test_an_empty_disk(tmp_path: Path) -> None:
    async with await LayeredDisk.create(tmp_path / "empty", 0) as disk:
        snapshot = await disk.snapshot("s")
        assert await disk.active().read(0, 0) == b""
        assert await disk.active().extents() == []
        assert await disk.changed_extents(snapshot.id) == []
        await disk.consolidate()


async def test_a_full_disk(disk: LayeredDisk) -> None:
    view = disk.active()
    await fill(view, 20)
    assert await view.extents() == [Extent(0, SIZE)]
    snapshot = await disk.snapshot("s")
    replacement = await fill(view, 21)
    assert await disk.changed_extents(snapshot.id) == [Extent(0, SIZE)]
    assert await view.read(0, SIZE) == replacement
    assert await disk.at(snapshot.id).read(0, SIZE) == pattern(20, SIZE)


@pytest.mark.parametrize(("offset", "length"), [(-1, 1), (0, -1), (SIZE, 1), (SIZE - 1, 2)])
async def test_out_of_range_is_refused(disk: LayeredDisk, offset: int, length: int) -> None:
    with pytest.raises(ValueError, match="outside"):
        await disk.active().read(offset, length)
    with pytest.raises(ValueError, match="outside"):
        await disk.active().zero(offset, length)
    if length > 0:
        with pytest.raises(ValueError, match="outside"):
            await disk.active().write(offset, bytes(length))


async def test_a_snapshot_view_is_read_only(disk: LayeredDisk) -> None:
    snapshot = await disk.snapshot("s")
    with pytest.raises(PermissionError):
        await disk.at(snapshot.id).write(0, b"x")
    with pytest.raises(PermissionError):
        await disk.at(snapshot.id).zero(0, 1)
    with pytest.raises(UnknownSnapshot):
        disk.at("nope")


@pytest.mark.parametrize("granularity", [0, 1000, 2048, 3 * 4096, 2 * 1024 * 1024])
async def test_bad_granularity_is_refused(tmp_path: Path, granularity: int) -> None:
    with pytest.raises(ValueError, match="granularity"):
        await LayeredDisk.create(tmp_path / "d", G, granularity=granularity)


async def test_create_refuses_an_existing_disk(disk: LayeredDisk) -> None:
    with pytest.raises(FileExistsError):
        await LayeredDisk.create(disk.directory, SIZE)


async def test_a_disk_is_opened_by_one_owner(disk: LayeredDisk) -> None:
    with pytest.raises(DiskInUse):
        await LayeredDisk.open(disk.directory)


async def test_a_closed_disk_refuses_io(disk: LayeredDisk) -> None:
    await disk.close()
    with pytest.raises(ValueError, match="closed"):
        await disk.active().read(0, 1)
    await disk.close()  # twice is fine


async def test_concurrent_partial_writes_to_one_block_all_land(disk: LayeredDisk) -> None:
    view = disk.active()
    model = await fill(view, 30)
    await disk.snapshot("s")
    pieces = [(block * G + i * 997, pattern(100 + i, 500)) for block in (2, 3) for i in range(40)]
    random.Random(1).shuffle(pieces)
    await asyncio.gather(*(view.write(offset, data) for offset, data in pieces))
    for offset, data in pieces:
        model[offset : offset + len(data)] = data
    assert await view.read(0, SIZE) == model


async def test_a_cancelled_write_finishes_or_leaves_the_old_content(tmp_path: Path) -> None:
    disk = await LayeredDisk.create(tmp_path / "d", SIZE, granularity=G)
    view = disk.active()
    old = await fill(view, 40)
    snapshot = await disk.snapshot("s")
    new = pattern(41, 4 * G)
    task = asyncio.create_task(view.write(G + 1, new))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await disk.close()
    async with await LayeredDisk.open(disk.directory) as reopened:
        content = await reopened.active().read(0, SIZE)
        assert content in (bytes(old), bytes(old[: G + 1] + new + old[G + 1 + len(new) :]))
        changed = await reopened.changed_extents(snapshot.id)
        assert (changed == []) == (content == old)


async def test_a_damaged_manifest_is_reported(tmp_path: Path) -> None:
    disk = await LayeredDisk.create(tmp_path / "d", SIZE)
    await disk.close()
    (disk.directory / "manifest.json").write_text("{not json")
    with pytest.raises(DiskCorrupt, match="manifest"):
        await LayeredDisk.open(disk.directory)


async def test_a_missing_layer_is_reported(tmp_path: Path) -> None:
    disk = await LayeredDisk.create(tmp_path / "d", SIZE)
    await disk.snapshot("s")
    await disk.close()
    (disk.directory / "overlay-000001.raw").unlink()
    with pytest.raises(DiskCorrupt, match="missing"):
        await LayeredDisk.open(disk.directory)


def bytes_read_by_this_process() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


async def test_mapping_a_4_gib_disk_with_layers_reads_no_data(tmp_path: Path) -> None:
    size = 4 * 1024**3
    async with await LayeredDisk.create(tmp_path / "big", size) as disk:
        view = disk.active()
        rng = random.Random(5)
        for layer in range(4):
            for _ in range(64):
                await view.write(rng.randrange(size - 8192), pattern(layer, 8192))
            await view.zero(rng.randrange(size - 2**20), 2**20)
            first = await disk.snapshot(f"s{layer}")
        before = bytes_read_by_this_process()
        extents = await view.extents()
        at_snapshot = await disk.at(first.id).extents()
        changed = await disk.changed_extents(disk.snapshots()[0].id)
        assert bytes_read_by_this_process() - before < 64 * 1024
        assert extents[-1].end == at_snapshot[-1].end == size
        assert len(changed) > 64
