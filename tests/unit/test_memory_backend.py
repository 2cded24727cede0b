"""MemoryBackend: bytes like a disk, allocation tracked per block like a sparse file."""

from __future__ import annotations

import os

import pytest

from appliance.storage.backend import Backend
from appliance.storage.extents import Extent
from appliance.storage.memory import MemoryBackend

BS = 4096


def hole(start: int, length: int) -> Extent:
    return Extent(start, length, zero=True, hole=True)


def test_memory_backend_implements_the_backend_protocol() -> None:
    assert isinstance(MemoryBackend(BS), Backend)


async def test_new_backend_is_all_hole_and_holds_no_memory() -> None:
    backend = MemoryBackend(2**40)
    assert await backend.extents() == [hole(0, 2**40)]
    assert await backend.read(2**39, 10) == bytes(10)
    assert backend.allocated_bytes == 0


async def test_empty_backend_has_no_extents() -> None:
    backend = MemoryBackend(0)
    assert await backend.extents() == []
    assert await backend.read(0, 0) == b""


@pytest.mark.parametrize("offset", [0, 1, BS - 1, BS, 3 * BS + 7])
async def test_unaligned_write_reads_back_and_allocates_the_blocks_it_touches(offset: int) -> None:
    backend = MemoryBackend(16 * BS)
    data = os.urandom(BS + 3)
    await backend.write(offset, data)
    assert await backend.read(offset, len(data)) == data
    assert await backend.read(0, offset) == bytes(offset)
    first, last = offset // BS, (offset + len(data) - 1) // BS
    assert backend.allocated_bytes == (last - first + 1) * BS
    extents = await backend.extents()
    assert Extent(first * BS, (last - first + 1) * BS) in extents


async def test_zero_punch_hole_frees_whole_blocks_and_zeroes_partial_ones() -> None:
    backend = MemoryBackend(8 * BS)
    data = os.urandom(8 * BS)
    await backend.write(0, data)
    await backend.zero(BS + 100, 3 * BS, punch_hole=True)
    expected = data[: BS + 100] + bytes(3 * BS) + data[4 * BS + 100 :]
    assert await backend.read(0, 8 * BS) == expected
    assert await backend.extents() == [
        Extent(0, 2 * BS),
        hole(2 * BS, 2 * BS),
        Extent(4 * BS, 4 * BS),
    ]
    assert backend.allocated_bytes == 6 * BS


async def test_zero_without_punch_hole_keeps_blocks_allocated_as_known_zero() -> None:
    backend = MemoryBackend(4 * BS)
    await backend.write(0, os.urandom(4 * BS))
    await backend.zero(BS, 2 * BS)
    assert await backend.extents() == [
        Extent(0, BS),
        Extent(BS, 2 * BS, zero=True),
        Extent(3 * BS, BS),
    ]
    assert backend.allocated_bytes == 4 * BS
    await backend.zero(0, 4 * BS, punch_hole=True)
    assert await backend.extents() == [hole(0, 4 * BS)]


async def test_zero_on_a_hole_without_punch_allocates_it() -> None:
    backend = MemoryBackend(2 * BS)
    await backend.zero(0, BS)
    await backend.zero(BS + 1, 10)
    assert await backend.extents() == [Extent(0, BS, zero=True), Extent(BS, BS)]
    assert await backend.read(0, 2 * BS) == bytes(2 * BS)


async def test_short_last_block_is_handled_like_a_whole_one() -> None:
    backend = MemoryBackend(BS + 10)
    await backend.write(BS, b"x" * 10)
    await backend.zero(BS, 10, punch_hole=True)
    assert await backend.extents() == [hole(0, BS + 10)]


async def test_from_bytes_leaves_zero_blocks_as_holes() -> None:
    data = bytes(BS) + b"a" * BS + bytes(BS) + b"b"
    backend = MemoryBackend.from_bytes(data, readonly=True)
    assert await backend.read(0, len(data)) == data
    assert await backend.extents() == [
        hole(0, BS),
        Extent(BS, BS),
        hole(2 * BS, BS),
        Extent(3 * BS, 1),
    ]
    assert backend.readonly


async def test_readonly_refuses_changes() -> None:
    backend = MemoryBackend(BS, readonly=True)
    with pytest.raises(PermissionError):
        await backend.write(0, b"x")
    with pytest.raises(PermissionError):
        await backend.zero(0, 1)


async def test_ranges_outside_the_disk_are_refused() -> None:
    backend = MemoryBackend(BS)
    with pytest.raises(ValueError):
        await backend.read(BS - 1, 2)
    with pytest.raises(ValueError):
        await backend.write(BS, b"x")
    with pytest.raises(ValueError):
        await backend.zero(-1, 1)


async def test_flush_and_close_are_recorded() -> None:
    async with MemoryBackend(BS) as backend:
        await backend.flush()
        assert backend.flushes == 1
    assert backend.closed


async def test_zeroing_a_huge_range_costs_only_what_is_allocated() -> None:
    backend = MemoryBackend(2**40)
    await backend.write(2**39 + 5, b"data")
    await backend.zero(3, 2**40 - 3, punch_hole=True)
    assert await backend.extents() == [hole(0, 2**40)]
    assert backend.allocated_bytes == 0


async def test_custom_block_size_sets_the_allocation_granularity() -> None:
    backend = MemoryBackend(1024 * 1024, block_size=65536)
    await backend.write(70000, b"x")
    assert await backend.extents() == [
        hole(0, 65536),
        Extent(65536, 65536),
        hole(131072, 1024 * 1024 - 131072),
    ]
