"""Random sequences of operations on a LayeredDisk against a bytearray model of every view."""

from __future__ import annotations

import asyncio
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.storage.extents import Extent
from appliance.storage.layered import LayeredDisk

G = 4096
SIZE = 10 * G + 1000  # the last block is short


@dataclass
class Model:
    """The disk now, every snapshot's bytes, and the blocks written in each layer's time."""

    now: bytearray = field(default_factory=lambda: bytearray(SIZE))
    snapshots: list[tuple[str, bytes]] = field(default_factory=list)
    epochs: list[set[int]] = field(default_factory=lambda: [set()])

    def write(self, offset: int, data: bytes) -> None:
        self.now[offset : offset + len(data)] = data
        self.epochs[-1].update(range(offset // G, -(-(offset + len(data)) // G)))

    def snapshot(self, snapshot_id: str) -> None:
        self.snapshots.append((snapshot_id, bytes(self.now)))
        self.epochs.append(set())

    def delete(self, index: int) -> None:
        del self.snapshots[index]
        self.epochs[index] |= self.epochs.pop(index + 1)

    def consolidate(self) -> None:
        self.snapshots.clear()
        self.epochs = [set()]

    def changed(self, first: int, last: int | None) -> set[int]:
        stop = len(self.epochs) - 1 if last is None else last
        return set().union(*self.epochs[first + 1 : stop + 1])


offsets = st.integers(min_value=0, max_value=SIZE - 1)
operations = st.one_of(
    st.tuples(st.just("write"), offsets, st.integers(1, 3 * G), st.integers(0, 2**16)),
    st.tuples(st.just("zero"), offsets, st.integers(1, 4 * G), st.booleans()),
    st.tuples(st.just("snapshot")),
    st.tuples(st.just("delete"), st.integers(0, 7)),
    st.tuples(st.just("consolidate")),
    st.tuples(st.just("reopen")),
)


async def apply(disk: LayeredDisk, model: Model, operation: tuple[object, ...]) -> LayeredDisk:
    match operation:
        case ("write", int(offset), int(length), int(seed)):
            data = random.Random(seed).randbytes(min(length, SIZE - offset))
            await disk.active().write(offset, data)
            model.write(offset, data)
        case ("zero", int(offset), int(length), bool(punch_hole)):
            length = min(length, SIZE - offset)
            await disk.active().zero(offset, length, punch_hole=punch_hole)
            model.write(offset, bytes(length))
        case ("snapshot",):
            model.snapshot((await disk.snapshot("s")).id)
        case ("delete", int(index)) if model.snapshots:
            index %= len(model.snapshots)
            await disk.delete_snapshot(model.snapshots[index][0])
            model.delete(index)
        case ("consolidate",):
            await disk.consolidate()
            model.consolidate()
        case ("reopen",):
            await disk.close()
            return await LayeredDisk.open(disk.directory)
    return disk


def blocks_of(extents: list[Extent]) -> set[int]:
    return {b for e in extents for b in range(e.start // G, -(-e.end // G))}


async def check_map(disk: LayeredDisk, snapshot_id: str | None, content: bytes) -> None:
    view = disk.active() if snapshot_id is None else disk.at(snapshot_id)
    assert await view.read(0, SIZE) == content
    position = 0
    for extent in await view.extents():
        assert extent.start == position
        position = extent.end
        if extent.zero:
            assert content[extent.start : extent.end] == bytes(extent.length)
    assert position == SIZE


async def check(disk: LayeredDisk, model: Model) -> None:
    await check_map(disk, None, bytes(model.now))
    assert [s.id for s in disk.snapshots()] == [snapshot_id for snapshot_id, _ in model.snapshots]
    ids = [snapshot_id for snapshot_id, _ in model.snapshots]
    for first, (snapshot_id, content) in enumerate(model.snapshots):
        await check_map(disk, snapshot_id, content)
        for last in [*range(first, len(ids)), None]:
            to_id = None if last is None else ids[last]
            changed = await disk.changed_extents(snapshot_id, to_id)
            assert blocks_of(changed) == model.changed(first, last)
            at_to = bytes(model.now) if last is None else model.snapshots[last][1]
            for extent in changed:
                if extent.zero:
                    assert at_to[extent.start : extent.end] == bytes(extent.length)


async def run(operations: list[tuple[object, ...]]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        disk = await LayeredDisk.create(Path(directory) / "disk", SIZE, granularity=G)
        model = Model()
        try:
            for operation in operations:
                disk = await apply(disk, model, operation)
                await check_map(disk, None, bytes(model.now))
            await check(disk, model)
        finally:
            await disk.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(operations, max_size=25))
def test_random_operations_match_the_model(operations: list[tuple[object, ...]]) -> None:
    asyncio.run(run(operations))
