"""Snapshots of a LayeredDisk: reads at a point in time, change lists, delete and consolidate."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from appliance.clock import FakeClock
from appliance.errors import UnknownSnapshot
from appliance.storage.extents import Extent
from appliance.storage.layered import LayeredDisk

G = 64 * 1024
SIZE = 32 * G + 4096


def pattern(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


@pytest.fixture
async def disk(tmp_path: Path) -> AsyncIterator[LayeredDisk]:
    async with await LayeredDisk.create(tmp_path / "disk", SIZE, granularity=G) as opened:
        yield opened


def blocks_of(extents: list[Extent]) -> set[int]:
    return {b for e in extents for b in range(e.start // G, -(-e.end // G))}


async def test_snapshot_then_overwrite_then_read_at_the_snapshot(disk: LayeredDisk) -> None:
    view = disk.active()
    before = pattern(1, SIZE)
    await view.write(0, before)
    snapshot = await disk.snapshot("before")
    await view.write(G + 3, pattern(2, 5 * G))
    await view.zero(10 * G, 4 * G)
    assert await disk.at(snapshot.id).read(0, SIZE) == before
    assert await disk.at(snapshot.id).extents() == [Extent(0, SIZE)]


@pytest.mark.parametrize(("offset", "length"), [(0, SIZE), (G - 7, 3 * G + 11), (SIZE - 5, 5)])
async def test_read_into_matches_read_across_layers(
    disk: LayeredDisk, offset: int, length: int
) -> None:
    view = disk.active()
    await view.write(0, pattern(3, SIZE))
    first = await disk.snapshot("first")
    await view.write(2 * G + 100, pattern(4, 3 * G))  # the top layer owns some blocks
    await view.zero(6 * G, G)
    for backend in (view, disk.at(first.id)):
        buffer = bytearray(length + 2)
        await backend.read_into(offset, memoryview(buffer)[1:-1])
        assert bytes(buffer[1:-1]) == await backend.read(offset, length)
        assert buffer[0] == buffer[-1] == 0


async def test_snapshot_info(tmp_path: Path) -> None:
    clock = FakeClock()
    async with await LayeredDisk.create(tmp_path / "d", SIZE, clock=clock) as disk:
        first = await disk.snapshot("first")
        clock.advance(60)
        second = await disk.snapshot("../../etc/passwd\x00")  # names are data, never paths
        assert disk.snapshots() == [first, second]
        assert second.created_at.timestamp() - first.created_at.timestamp() == 60
        assert first.id != second.id
        assert sorted(p.name for p in disk.directory.iterdir()) == [
            "base.raw",
            "base.zeroed",
            "lock",
            "manifest.json",
            "overlay-000001.bitmap",
            "overlay-000001.raw",
            "overlay-000002.bitmap",
            "overlay-000002.raw",
        ]


async def test_changed_extents_are_the_blocks_written_since(disk: LayeredDisk) -> None:
    view = disk.active()
    await view.write(0, pattern(1, SIZE))
    first = await disk.snapshot("first")
    await view.write(G + 1, b"a")  # block 1
    await view.write(5 * G - 1, b"bc")  # blocks 4 and 5
    await view.zero(8 * G, 3 * G)  # blocks 8..10, now zero
    second = await disk.snapshot("second")
    await view.write(20 * G, pattern(3, G))  # block 20
    await view.write(SIZE - 1, b"z")  # the short last block

    assert await disk.changed_extents(first.id, second.id) == [
        Extent(G, G),
        Extent(4 * G, 2 * G),
        Extent(8 * G, 3 * G, zero=True),
    ]
    assert await disk.changed_extents(second.id) == [Extent(20 * G, G), Extent(32 * G, 4096)]
    assert blocks_of(await disk.changed_extents(first.id)) == {1, 4, 5, 8, 9, 10, 20, 32}
    assert await disk.changed_extents(second.id, second.id) == []
    with pytest.raises(ValueError, match="before"):
        await disk.changed_extents(second.id, first.id)
    with pytest.raises(UnknownSnapshot):
        await disk.changed_extents("nope")


async def test_a_zero_change_overwritten_with_data_is_data(disk: LayeredDisk) -> None:
    view = disk.active()
    snapshot = await disk.snapshot("s")
    await view.zero(0, 4 * G)
    await view.write(2 * G + 5, b"data")
    assert await disk.changed_extents(snapshot.id) == [
        Extent(0, 2 * G, zero=True),
        Extent(2 * G, G),
        Extent(3 * G, G, zero=True),
    ]


async def test_changed_extents_are_never_truncated(disk: LayeredDisk) -> None:
    view = disk.active()
    snapshot = await disk.snapshot("s")
    for block in range(0, 33, 2):  # every other block: 17 separate runs
        await view.write(block * G, b"x")
    changed = await disk.changed_extents(snapshot.id)
    assert [e.start // G for e in changed] == list(range(0, 33, 2))


class Reference:
    """The expected content of the disk now and at every snapshot, as bytearrays."""

    def __init__(self, size: int) -> None:
        self.now = bytearray(size)
        self.at: dict[str, bytes] = {}

    def write(self, offset: int, data: bytes) -> None:
        self.now[offset : offset + len(data)] = data


async def check_every_view(disk: LayeredDisk, reference: Reference) -> None:
    assert await disk.active().read(0, SIZE) == reference.now
    assert {s.id for s in disk.snapshots()} == set(reference.at)
    for snapshot_id, content in reference.at.items():
        assert await disk.at(snapshot_id).read(0, SIZE) == content, snapshot_id


async def build_history(disk: LayeredDisk, reference: Reference, count: int) -> list[str]:
    rng = random.Random(7)
    view = disk.active()
    ids = []
    for step in range(count):
        for _ in range(6):
            offset = rng.randrange(SIZE - 1)
            data = pattern(step * 100 + _, rng.randrange(1, min(3 * G, SIZE - offset)))
            await view.write(offset, data)
            reference.write(offset, data)
        zero_at = rng.randrange(SIZE - G)
        await view.zero(zero_at, G + 1)
        reference.write(zero_at, bytes(G + 1))
        snapshot = await disk.snapshot(f"s{step}")
        reference.at[snapshot.id] = bytes(reference.now)
        ids.append(snapshot.id)
    await view.write(3, pattern(999, 2 * G))
    reference.write(3, pattern(999, 2 * G))
    return ids


@pytest.mark.parametrize("victim", [0, 1, 2, 3], ids=["oldest", "second", "middle", "newest"])
async def test_delete_a_snapshot_keeps_every_other_view(disk: LayeredDisk, victim: int) -> None:
    reference = Reference(SIZE)
    ids = await build_history(disk, reference, 4)
    changes_before = {
        (a, b): blocks_of(await disk.changed_extents(ids[a], ids[b] if b < 4 else None))
        for a in range(4)
        for b in range(a, 5)
    }
    await disk.delete_snapshot(ids[victim])
    del reference.at[ids[victim]]
    await check_every_view(disk, reference)
    for (a, b), blocks in changes_before.items():
        if victim not in (a, b):
            after = await disk.changed_extents(ids[a], ids[b] if b < 4 else None)
            assert blocks_of(after) == blocks, (a, b)
    with pytest.raises(UnknownSnapshot):
        await disk.at(ids[victim]).read(0, 1)
    assert len(list(disk.directory.glob("overlay-*.raw"))) == 3


async def test_delete_every_snapshot_one_by_one(disk: LayeredDisk) -> None:
    reference = Reference(SIZE)
    ids = await build_history(disk, reference, 5)
    for victim in [ids[2], ids[4], ids[0], ids[3], ids[1]]:
        await disk.delete_snapshot(victim)
        del reference.at[victim]
        await check_every_view(disk, reference)
    assert list(disk.directory.glob("overlay-*")) == []


async def test_consolidate_folds_everything_into_the_base(disk: LayeredDisk) -> None:
    reference = Reference(SIZE)
    await build_history(disk, reference, 3)
    extents_before = await disk.active().extents()
    await disk.consolidate()
    reference.at.clear()
    await check_every_view(disk, reference)
    assert await disk.active().extents() == extents_before
    assert list(disk.directory.glob("overlay-*")) == []
    await disk.active().write(0, b"after")  # writes go to the base now
    assert await disk.active().read(0, 5) == b"after"


async def test_snapshots_survive_reopening(tmp_path: Path) -> None:
    reference = Reference(SIZE)
    disk = await LayeredDisk.create(tmp_path / "d", SIZE, granularity=G)
    ids = await build_history(disk, reference, 3)
    changed = await disk.changed_extents(ids[0])
    await disk.close()
    async with await LayeredDisk.open(tmp_path / "d") as reopened:
        await check_every_view(reopened, reference)
        assert await reopened.changed_extents(ids[0]) == changed
        assert reopened.granularity == G
