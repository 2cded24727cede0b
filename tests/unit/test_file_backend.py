"""FileBackend over real sparse files: bytes, allocation map, zeroing and its fallbacks."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest

from appliance.storage import file as file_module
from appliance.storage.backend import Backend
from appliance.storage.extents import Extent, data_length
from appliance.storage.file import FileBackend
from appliance.storage.hashing import chunk_hash

KiB = 1024
MiB = 1024 * KiB


def hole(start: int, length: int) -> Extent:
    return Extent(start, length, zero=True, hole=True)


def test_file_backend_implements_the_backend_protocol(tmp_path: Path) -> None:
    backend = FileBackend.create(tmp_path / "disk.raw", MiB)
    assert isinstance(backend, Backend)


async def test_create_makes_a_sparse_file_that_is_one_hole(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    async with FileBackend.create(path, 8 * MiB) as backend:
        assert backend.size == 8 * MiB == path.stat().st_size
        assert await backend.extents() == [hole(0, 8 * MiB)]
        assert await backend.read(5 * MiB + 3, 100) == bytes(100)
    assert path.stat().st_blocks == 0


async def test_create_refuses_an_existing_file_unless_asked(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    path.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        FileBackend.create(path, MiB)
    async with FileBackend.create(path, MiB, exist_ok=True) as backend:
        assert backend.size == MiB


async def test_huge_empty_disk_maps_as_one_hole(tmp_path: Path) -> None:
    async with FileBackend.create(tmp_path / "huge.raw", 2**40) as backend:
        assert await backend.extents() == [hole(0, 2**40)]


@pytest.mark.parametrize("offset", [0, 1, 511, 4095, 4096, 65537])
async def test_unaligned_writes_read_back_and_land_in_the_file(tmp_path: Path, offset: int) -> None:
    path = tmp_path / "disk.raw"
    data = os.urandom(3 * 4096 + 17)
    async with FileBackend.create(path, MiB) as backend:
        await backend.write(offset, data)
        assert await backend.read(offset, len(data)) == data
        await backend.flush()
    assert path.read_bytes()[offset : offset + len(data)] == data


async def test_write_accepts_a_memoryview(tmp_path: Path) -> None:
    async with FileBackend.create(tmp_path / "disk.raw", MiB) as backend:
        buffer = bytearray(b"abcdefgh" * 1000)
        await backend.write(100, memoryview(buffer)[8:])
        assert await backend.read(100, 8) == b"abcdefgh"


async def test_extents_follow_data_and_holes_at_file_system_granularity(tmp_path: Path) -> None:
    async with FileBackend.create(tmp_path / "disk.raw", 4 * MiB) as backend:
        await backend.write(MiB, os.urandom(64 * KiB))
        await backend.write(3 * MiB + 10, b"x")
        extents = await backend.extents()
        assert extents[0] == hole(0, MiB)
        assert extents[1] == Extent(MiB, 64 * KiB)
        assert extents[-1] == hole(3 * MiB + 4 * KiB, MiB - 4 * KiB)
        assert sum(extent.length for extent in extents) == 4 * MiB


async def test_extents_of_a_subrange_are_clipped_to_it(tmp_path: Path) -> None:
    async with FileBackend.create(tmp_path / "disk.raw", 4 * MiB) as backend:
        await backend.write(MiB, os.urandom(MiB))
        assert await backend.extents(MiB + 5, 10) == [Extent(MiB + 5, 10)]
        assert await backend.extents(MiB - 7, 14) == [hole(MiB - 7, 7), Extent(MiB, 7)]
        assert await backend.extents(4 * MiB, 0) == []


async def test_extents_are_walked_to_the_end_however_fragmented(tmp_path: Path) -> None:
    blocks = 600
    async with FileBackend.create(tmp_path / "disk.raw", blocks * 8 * KiB) as backend:
        for index in range(blocks):
            await backend.write(index * 8 * KiB, b"\xff" * 4 * KiB)
        extents = await backend.extents()
        assert len(extents) == 2 * blocks
        assert data_length(extents) == blocks * 4 * KiB
        assert extents[-1] == hole((2 * blocks - 1) * 4 * KiB, 4 * KiB)


async def test_zero_with_punch_hole_deallocates(tmp_path: Path) -> None:
    async with FileBackend.create(tmp_path / "disk.raw", MiB) as backend:
        await backend.write(0, os.urandom(MiB))
        await backend.zero(256 * KiB, 128 * KiB, punch_hole=True)
        assert await backend.read(256 * KiB, 128 * KiB) == bytes(128 * KiB)
        assert hole(256 * KiB, 128 * KiB) in await backend.extents()


async def test_zero_without_punch_hole_reads_zero_and_keeps_neighbours(tmp_path: Path) -> None:
    data = os.urandom(MiB)
    async with FileBackend.create(tmp_path / "disk.raw", MiB) as backend:
        await backend.write(0, data)
        await backend.zero(1000, 5000)
        expected = data[:1000] + bytes(5000) + data[6000:]
        assert await backend.read(0, MiB) == expected


async def test_zero_falls_back_to_writing_zeroes_and_remembers_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def unsupported(fd: int, mode: int, offset: int, length: int) -> None:
        calls.append(mode)
        raise OSError(errno.EOPNOTSUPP, "not here")

    monkeypatch.setattr(file_module, "fallocate", unsupported)
    data = os.urandom(3 * MiB)
    async with FileBackend.create(tmp_path / "disk.raw", 3 * MiB) as backend:
        await backend.write(0, data)
        await backend.zero(10, 2 * MiB + 5, punch_hole=True)
        assert (
            await backend.read(0, 3 * MiB) == data[:10] + bytes(2 * MiB + 5) + data[2 * MiB + 15 :]
        )
        tried = len(calls)
        await backend.zero(0, 100, punch_hole=True)
        await backend.zero(0, 100)
        assert len(calls) == tried == 2
        assert await backend.read(0, 100) == bytes(100)


async def test_zero_errors_other_than_unsupported_are_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "full")

    monkeypatch.setattr(file_module, "fallocate", no_space)
    async with FileBackend.create(tmp_path / "disk.raw", MiB) as backend:
        with pytest.raises(OSError) as caught:
            await backend.zero(0, 4096)
        assert caught.value.errno == errno.ENOSPC


async def test_readonly_backend_reads_but_refuses_changes(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    path.write_bytes(b"hello" + bytes(4091))
    async with FileBackend.open(path, readonly=True) as backend:
        assert backend.readonly
        assert await backend.read(0, 5) == b"hello"
        with pytest.raises(PermissionError):
            await backend.write(0, b"x")
        with pytest.raises(PermissionError):
            await backend.zero(0, 10)
        await backend.flush()
    assert path.read_bytes()[:5] == b"hello"


@pytest.mark.parametrize(("offset", "length"), [(-1, 1), (MiB, 1), (MiB - 1, 2), (0, MiB + 1)])
async def test_ranges_outside_the_disk_are_refused(
    tmp_path: Path, offset: int, length: int
) -> None:
    async with FileBackend.create(tmp_path / "disk.raw", MiB) as backend:
        with pytest.raises(ValueError):
            await backend.read(offset, length)
        with pytest.raises(ValueError):
            await backend.write(offset, bytes(max(length, 0)))
        with pytest.raises(ValueError):
            await backend.extents(offset, length)


async def test_closed_backend_refuses_io_and_close_is_idempotent(tmp_path: Path) -> None:
    backend = FileBackend.create(tmp_path / "disk.raw", MiB)
    await backend.close()
    await backend.close()
    with pytest.raises(ValueError):
        await backend.read(0, 1)


async def test_concurrent_writes_to_disjoint_ranges_all_land(tmp_path: Path) -> None:
    pieces = {index * 64 * KiB: os.urandom(64 * KiB) for index in range(32)}
    async with FileBackend.create(tmp_path / "disk.raw", 2 * MiB, workers=4) as backend:
        await asyncio.gather(*(backend.write(offset, data) for offset, data in pieces.items()))
        for offset, data in pieces.items():
            assert await backend.read(offset, len(data)) == data


@pytest.mark.parametrize(
    ("offset", "length", "block"),
    [
        (0, 4 * MiB, MiB),  # whole pieces
        (4095, 3 * MiB + 7, 64 * KiB),  # unaligned, the last block clipped
        (MiB - 1, 5 * MiB, 3 * MiB),  # blocks larger than a read piece
        (0, 0, MiB),  # nothing to hash
    ],
)
async def test_hash_blocks_hashes_each_block_as_it_reads(
    tmp_path: Path, offset: int, length: int, block: int
) -> None:
    data = os.urandom(2 * MiB)
    async with FileBackend.create(tmp_path / "disk.raw", 8 * MiB) as disk:
        await disk.write(MiB, data)  # data between holes
        expected_bytes = await disk.read(offset, length)
        expected = [chunk_hash(expected_bytes[at : at + block]) for at in range(0, length, block)]
        assert await disk.hash_blocks(offset, length, block) == expected
        with pytest.raises(ValueError):
            await disk.hash_blocks(7 * MiB, 2 * MiB, MiB)
