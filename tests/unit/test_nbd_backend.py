"""The Backend contract, held by every backend: memory, file, layered, and NBD over each."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from appliance.datapath.nbd.backend import NbdBackend
from appliance.datapath.nbd.server import NbdServer
from appliance.storage.backend import Backend
from appliance.storage.extents import Extent, clip, data_length
from appliance.storage.file import FileBackend
from appliance.storage.layered import LayeredDisk
from appliance.storage.memory import MemoryBackend

MiB = 1024 * 1024
SIZE = 4 * MiB
KINDS = ["memory", "file", "layered", "nbd-memory", "nbd-file", "nbd-layered"]


@pytest.fixture(params=KINDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    async with AsyncExitStack() as stack:
        kind: str = request.param
        local: Backend
        if kind.endswith("file"):
            local = await stack.enter_async_context(FileBackend.create(tmp_path / "d.raw", SIZE))
        elif kind.endswith("layered"):
            disk = await stack.enter_async_context(
                await LayeredDisk.create(tmp_path / "layered", SIZE)
            )
            local = disk.active()
        else:
            local = MemoryBackend(SIZE)
        if not kind.startswith("nbd"):
            yield local
            return
        # A small max block makes the NBD backend split ordinary requests.
        server = await stack.enter_async_context(NbdServer({"d": local}, max_block=MiB))
        yield await stack.enter_async_context(await NbdBackend.connect(server.address, "d"))


def assert_covers(extents: list[Extent], start: int, end: int) -> None:
    pos = start
    for extent in extents:
        assert extent.start == pos and extent.length > 0
        pos = extent.end
    assert pos == end


async def test_new_backend_reads_zeroes_and_maps_as_nothing_to_copy(backend: Backend) -> None:
    assert backend.size == SIZE and not backend.readonly and backend.name
    assert isinstance(backend, Backend)
    assert await backend.read(SIZE - 100, 100) == bytes(100)
    extents = await backend.extents()
    assert_covers(extents, 0, SIZE)
    assert data_length(extents) == 0


@pytest.mark.parametrize("offset", [0, 1, 4095, 65536 + 3, MiB - 1, SIZE - 1500 * 1000])
async def test_unaligned_write_then_read(backend: Backend, offset: int) -> None:
    data = os.urandom(1500 * 1000)
    await backend.write(offset, data)
    assert await backend.read(offset, len(data)) == data
    assert await backend.read(max(0, offset - 10), min(10, offset)) == bytes(min(10, offset))


async def test_read_into_fills_a_caller_buffer_like_read(backend: Backend) -> None:
    data = os.urandom(2 * MiB + 5)
    await backend.write(1000, data)
    buffer = bytearray(b"\xee" * (2 * MiB + 100))
    view = memoryview(buffer)
    await backend.read_into(999, view[10 : 10 + 2 * MiB + 7])  # type: ignore[attr-defined]
    assert buffer[10 : 10 + 2 * MiB + 7] == b"\0" + data + b"\0"
    assert buffer[:10] == b"\xee" * 10 and buffer[2 * MiB + 17 :] == b"\xee" * 83


async def test_written_ranges_are_data_in_the_map(backend: Backend) -> None:
    await backend.write(MiB + 100, b"x" * 5000)
    extents = await backend.extents()
    assert_covers(extents, 0, SIZE)
    written = clip(extents, MiB + 100, MiB + 5100)
    assert all(extent.data for extent in written)
    assert_covers(written, MiB + 100, MiB + 5100)
    assert data_length(extents) < SIZE


async def test_extents_of_a_subrange_cover_exactly_that_range(backend: Backend) -> None:
    await backend.write(2 * MiB, b"y" * 4096)
    extents = await backend.extents(2 * MiB - 7, 9000)
    assert_covers(extents, 2 * MiB - 7, 2 * MiB + 8993)
    assert await backend.extents(SIZE, 0) == []


@pytest.mark.parametrize("punch_hole", [True, False])
async def test_zeroed_ranges_read_as_zero_and_map_as_zero_or_data(
    backend: Backend, punch_hole: bool
) -> None:
    data = os.urandom(SIZE)
    await backend.write(0, data)
    await backend.zero(MiB + 3, 2 * MiB, punch_hole=punch_hole)
    assert await backend.read(0, SIZE) == data[: MiB + 3] + bytes(2 * MiB) + data[3 * MiB + 3 :]
    assert_covers(await backend.extents(), 0, SIZE)
    await backend.zero(0, 0)


async def test_concurrent_writes_to_disjoint_ranges(backend: Backend) -> None:
    pieces = {offset: os.urandom(40_000) for offset in range(0, SIZE - 40_000, 130_000)}
    await asyncio.gather(*(backend.write(offset, data) for offset, data in pieces.items()))
    await backend.flush()
    reads = await asyncio.gather(*(backend.read(offset, 40_000) for offset in pieces))
    assert reads == list(pieces.values())


@pytest.mark.parametrize(("offset", "length"), [(SIZE, 1), (SIZE - 1, 2), (-1, 1)])
async def test_ranges_outside_the_disk_raise_value_error(
    backend: Backend, offset: int, length: int
) -> None:
    with pytest.raises(ValueError):
        await backend.read(offset, length)
    with pytest.raises(ValueError):
        await backend.write(offset, bytes(length))
    with pytest.raises(ValueError):
        await backend.zero(offset, length)
    with pytest.raises(ValueError):
        await backend.extents(offset, length)
