"""Write-back: writes stay in the cache until their epoch commits on-prem, then land exactly.

Capacity in these tests: scale 1/1024 makes the cache 3 MiB (48 chunks of
64 KiB) for a disk of a little over 4 MiB.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace
from pathlib import Path

import pytest

from appliance.components.cache.cache import CloudCache, Discard
from appliance.errors import CacheDiscardRefused, Conflict, StaleToken
from tests.support.cachelab import KiB, MiB, cache_lab, image_bytes, small_settings

SIZE = 4 * MiB + 12345
CHUNK = 64 * KiB


def apply(model: bytearray, offset: int, data: bytes) -> None:
    model[offset : offset + len(data)] = data


async def test_writes_invisible_onprem_until_commit_then_exact(tmp_path: Path) -> None:
    content = image_bytes(SIZE)
    model = bytearray(content)
    rng = random.Random(5)
    # A cache large enough (12 MiB) that no early epoch is cut by these writes.
    async with cache_lab(tmp_path, content, small_settings(scale=1 / 256)) as lab:
        for _ in range(40):
            offset = rng.randrange(0, SIZE - 1)
            data = rng.randbytes(rng.randrange(1, min(100 * KiB, SIZE - offset)))
            await lab.vm.write(offset, data)
            apply(model, offset, data)
        await lab.vm.zero(SIZE - 5000, 5000)
        apply(model, SIZE - 5000, bytes(5000))
        await lab.vm.flush()
        assert await lab.vm.read(0, SIZE) == model
        assert lab.sink.read_image() == content  # nothing on-prem before a commit
        assert lab.cache.status().dirty_bytes > 0
        epoch = await lab.cache.cut_epoch("disk-0", 1)
        await lab.cache.wait_committed("disk-0", epoch)
        assert lab.sink.read_image() == model
        status = lab.cache.status()
        assert status.disks[0].committed_epoch == epoch
        assert status.dirty_bytes == 0
        assert status.exports == ("disk-0",)
        # Clean now, so evictable: reads still equal the model (hits or refetches).
        assert await lab.vm.read(0, SIZE) == model


async def test_written_set_covers_every_chunk_written(tmp_path: Path) -> None:
    content = image_bytes(SIZE)
    async with cache_lab(tmp_path, content) as lab:
        await lab.vm.write(3 * CHUNK + 100, b"a" * 10)
        await lab.vm.write(10 * CHUNK - 2, b"b" * 4)  # straddles chunks 9 and 10
        await lab.vm.zero(40 * CHUNK, CHUNK)
        await lab.vm.read(20 * CHUNK, 3 * CHUNK)  # reads do not count
        epoch = await lab.cache.cut_epoch("disk-0", 1)
        await lab.cache.wait_committed("disk-0", epoch)
        assert lab.cache.written_chunks("disk-0") == [3, 9, 10, 40]


async def test_eviction_under_pressure_never_drops_dirty_chunks(tmp_path: Path) -> None:
    content = image_bytes(SIZE, seed=9)
    model = bytearray(content)
    async with cache_lab(tmp_path, content) as lab:
        lab.sink.commit_gate = asyncio.Event()  # nothing commits: dirty stays dirty
        disk = lab.cache.disk("disk-0")
        slots = disk.store.geometry.slots
        for chunk in range(20):
            data = bytes([chunk + 1]) * 1000
            await lab.vm.write(chunk * CHUNK + 17, data)
            apply(model, chunk * CHUNK + 17, data)
        # Read the whole disk twice: far more than the cache holds, so clean chunks go.
        for _ in range(2):
            assert await lab.vm.read(0, SIZE) == model
            assert disk.store.used_slots <= slots
        assert lab.cache.status().cache_bytes <= lab.cache.status().disks[0].capacity_bytes
        for chunk in range(20):
            assert chunk in disk.store.live  # every dirty chunk is still cached
        lab.sink.commit_gate.set()
        epoch = await lab.cache.cut_epoch("disk-0", 1)
        await lab.cache.wait_committed("disk-0", epoch)
        assert lab.sink.read_image() == model


async def test_writer_waits_for_room_then_proceeds_after_commit(tmp_path: Path) -> None:
    content = image_bytes(SIZE, seed=4)
    model = bytearray(content)
    async with cache_lab(tmp_path, content) as lab:
        disk = lab.cache.disk("disk-0")
        lab.sink.commit_gate = asyncio.Event()
        data = random.Random(1).randbytes(SIZE)
        # The whole disk (66 chunks) cannot be dirty at once in a 48-chunk cache.
        writer = asyncio.create_task(lab.vm.write(0, data))
        await disk.writer_blocked.wait()
        assert not writer.done()
        assert disk.store.used_slots <= disk.store.geometry.slots
        lab.sink.commit_gate.set()  # epochs (cut early) commit, room frees, the writer goes on
        await writer
        apply(model, 0, data)
        assert disk.waited_for_room > 0
        await lab.vm.flush()
        assert await lab.vm.read(0, SIZE) == model
        epoch = await lab.cache.cut_epoch("disk-0", 1)
        await lab.cache.wait_committed("disk-0", epoch)
        assert lab.sink.read_image() == model


async def test_epoch_is_the_disk_at_cut_time_despite_rewrites_while_shipping(
    tmp_path: Path,
) -> None:
    content = image_bytes(SIZE, seed=2)
    at_cut = bytearray(content)
    async with cache_lab(tmp_path, content) as lab:
        rng = random.Random(8)
        writes = [(rng.randrange(0, SIZE - 70 * KiB), rng.randbytes(70 * KiB)) for _ in range(8)]
        for offset, data in writes:
            await lab.vm.write(offset, data)
            apply(at_cut, offset, data)
        lab.sink.stage_gate = asyncio.Event()
        epoch = await lab.cache.cut_epoch("disk-0", 1)
        await lab.sink.staged.wait()  # shipping has begun, held before it copies
        later = bytearray(at_cut)
        for offset, _ in writes:  # rewrite every chunk of the epoch, and more
            data = rng.randbytes(90 * KiB)
            await lab.vm.write(offset, data)
            apply(later, offset, data)
        assert await lab.vm.read(0, SIZE) == later
        lab.sink.stage_gate.set()
        await lab.cache.wait_committed("disk-0", epoch)
        assert lab.sink.read_image() == at_cut
        following = await lab.cache.cut_epoch("disk-0", 1)
        assert following == epoch + 1
        await lab.cache.wait_committed("disk-0", following)
        assert lab.sink.read_image() == later


async def test_stale_token_is_refused_and_orders_are_idempotent(tmp_path: Path) -> None:
    content = image_bytes(SIZE)
    async with cache_lab(tmp_path, content, token=5) as lab:
        assert await lab.cache.open_disk(lab.order) == "disk-0"  # the same order: no-op
        with pytest.raises(StaleToken) as refused:
            await lab.cache.cut_epoch("disk-0", 4)
        assert (refused.value.token, refused.value.highest) == (4, 5)
        assert await lab.cache.cut_epoch("disk-0", 6) == 1
    # The highest token survives a restart of the cache.
    async with CloudCache(tmp_path / "cache", small_settings()) as cache:
        with pytest.raises(StaleToken):
            await cache.close_disk("disk-0", 5)
        assert cache.token("disk-0") == 6


async def test_a_takeover_restarts_shipping_that_a_stale_token_stopped(tmp_path: Path) -> None:
    content = image_bytes(SIZE, seed=8)
    model = bytearray(content)
    async with cache_lab(tmp_path, content, small_settings(scale=1 / 256)) as lab:
        shipper = lab.cache._opened("disk-0").shipper
        lab.sink.tokens["disk-0"] = 3  # another owner reached on-prem first
        await lab.vm.write(70_000, b"t" * 5000)
        model[70_000:75_000] = b"t" * 5000
        epoch = await lab.cache.cut_epoch("disk-0", 1)
        await shipper.fenced.wait()
        assert shipper.stale and shipper.fenced_by == 3
        assert lab.cache.status().disks[0].epochs_in_flight == (epoch,)
        # An open with a token below on-prem's leaves shipping stopped ...
        await lab.cache.open_disk(replace(lab.order, token=2))
        assert shipper.stale
        # ... the new owner's open restarts it, and the epoch commits with its token.
        await lab.cache.open_disk(replace(lab.order, token=3))
        await lab.cache.wait_committed("disk-0", epoch)
        assert lab.sink.read_image() == model
        assert lab.sink.tokens["disk-0"] == 3


async def test_epoch_cut_before_a_restart_ships_after_it(tmp_path: Path) -> None:
    content = image_bytes(SIZE, seed=6)
    model = bytearray(content)
    async with cache_lab(tmp_path, content) as lab:
        lab.sink.commit_gate = asyncio.Event()  # never released: the commit cannot happen
        data = random.Random(6).randbytes(300 * KiB)
        await lab.vm.write(123457, data)
        apply(model, 123457, data)
        epoch = await lab.cache.cut_epoch("disk-0", 1)
        assert lab.cache.status().disks[0].epochs_in_flight == (epoch,)
    assert (tmp_path / "onprem.raw").read_bytes() == content
    # A new cache process on the same data directory ships the held epoch by itself.
    async with cache_lab(tmp_path, content) as lab:
        await lab.cache.wait_committed("disk-0", epoch)
        assert lab.sink.read_image() == model
        assert await lab.vm.read(0, SIZE) == model
        assert await lab.cache.cut_epoch("disk-0", 1) == epoch + 1


async def test_concurrent_writers_readers_and_epochs_under_pressure(tmp_path: Path) -> None:
    """Four writers on their own regions, reading their writes back, epochs cut meanwhile,
    in a cache smaller than the disk: at the end on-prem equals every write, in order."""
    content = image_bytes(SIZE, seed=12)
    model = bytearray(content)
    region = SIZE // 4

    async def writer(index: int) -> None:
        rng = random.Random(100 + index)
        base = index * region
        for step in range(60):
            offset = base + rng.randrange(0, region - 1)
            length = rng.randrange(1, min(150 * KiB, base + region - offset) + 1)
            data = rng.randbytes(length)
            await lab.vm.write(offset, data)
            apply(model, offset, data)
            if step % 7 == 0:
                await lab.vm.flush()
            check = rng.randrange(base, base + region - 4096)
            assert await lab.vm.read(check, 4096) == model[check : check + 4096]

    async def cutter() -> None:
        for _ in range(10):
            await lab.cache.cut_epoch("disk-0", 1)
            await asyncio.sleep(0)

    async with cache_lab(tmp_path, content) as lab:
        async with asyncio.TaskGroup() as group:
            for index in range(4):
                group.create_task(writer(index))
            group.create_task(cutter())
        disk = lab.cache.disk("disk-0")
        assert disk.store.used_slots <= disk.store.geometry.slots
        epoch = await lab.cache.cut_epoch("disk-0", 1)
        await lab.cache.wait_committed("disk-0", epoch)
        assert lab.sink.read_image() == model
        assert await lab.vm.read(0, SIZE) == model
        assert lab.cache.status().dirty_bytes == 0


async def test_rpo_dirty_threshold_cuts_an_epoch_by_itself(tmp_path: Path) -> None:
    content = image_bytes(SIZE, seed=14)
    model = bytearray(content)
    settings = small_settings(scale=1 / 256, rpo_dirty_bytes=4 * CHUNK)
    async with cache_lab(tmp_path, content, settings) as lab:
        data = random.Random(7).randbytes(5 * CHUNK)
        await lab.vm.write(2 * CHUNK, data)  # five dirty chunks: over the RPO threshold
        apply(model, 2 * CHUNK, data)
        await lab.cache.wait_committed("disk-0", 1)  # nobody asked for epoch 1
        assert lab.sink.read_image()[2 * CHUNK : 6 * CHUNK] == model[2 * CHUNK : 6 * CHUNK]
        epoch = await lab.cache.cut_epoch("disk-0", 1)
        await lab.cache.wait_committed("disk-0", epoch)
        assert lab.sink.read_image() == model


async def test_a_closed_disk_refuses_io_and_reopens_with_its_data(tmp_path: Path) -> None:
    content = image_bytes(SIZE, seed=15)
    async with cache_lab(tmp_path, content) as lab:
        disk = lab.cache.disk("disk-0")
        await lab.vm.write(777, b"kept")
        await lab.cache.close_disk("disk-0", 1)
        assert lab.cache.status().exports == ()
        with pytest.raises(ValueError, match="closed"):
            await disk.write(0, b"x")
        await lab.cache.open_disk(lab.order)
        await lab.reconnect_vm()
        assert await lab.vm.read(777, 4) == b"kept"
        with pytest.raises(Conflict):
            await lab.cache.open_disk(replace(lab.order, migration_id="mig-2", token=2))
        await lab.cache.close_disk("disk-0", 2)
        # Another migration of the same disk starts from an empty cache.
        await lab.cache.open_disk(replace(lab.order, migration_id="mig-2", token=2))
        await lab.reconnect_vm()
        assert await lab.vm.read(777, 4) == content[777:781]


async def test_epochs_are_cut_at_the_interval_set_live(tmp_path: Path) -> None:
    content = image_bytes(SIZE, seed=16)
    model = bytearray(content)
    async with cache_lab(tmp_path, content, small_settings(epoch_interval_s=None)) as lab:
        await lab.vm.write(4321, b"timed")
        apply(model, 4321, b"timed")
        assert lab.cache.status().disks[0].open_epoch == 1  # no interval: no cut
        lab.cache.set_epoch_interval(0.01)
        await lab.cache.wait_committed("disk-0", 1)
        lab.cache.set_epoch_interval(None)
        assert lab.sink.read_image() == model


async def test_a_close_removes_the_disk_s_cache_only_once_on_prem_holds_it(
    tmp_path: Path,
) -> None:
    content = image_bytes(SIZE)
    disk_dir = tmp_path / "cache" / "disks" / "mig-1" / "disk-0"
    async with cache_lab(tmp_path, content, small_settings(scale=1 / 256)) as lab:
        await lab.vm.write(0, b"x" * CHUNK)
        await lab.vm.flush()
        await lab.vm.close()
        assert disk_dir.is_dir()
        with pytest.raises(CacheDiscardRefused) as refused:
            await lab.cache.close_disk("disk-0", 1, discard=Discard.IF_CLEAN)
        assert refused.value.dirty_bytes == CHUNK
        assert lab.cache.status().exports == ("disk-0",)  # still served, nothing lost
        await lab.cache.wait_committed("disk-0", await lab.cache.cut_epoch("disk-0", 1))
        await lab.cache.close_disk("disk-0", 1, discard=Discard.IF_CLEAN)
        assert lab.cache.status().exports == ()
        assert not disk_dir.exists()
        assert lab.sink.read_image()[:CHUNK] == b"x" * CHUNK


async def test_a_close_keeps_the_cache_unless_told_and_always_removes_it_when_told(
    tmp_path: Path,
) -> None:
    content = image_bytes(SIZE)
    disk_dir = tmp_path / "cache" / "disks" / "mig-1" / "disk-0"
    async with cache_lab(tmp_path, content, small_settings(scale=1 / 256)) as lab:
        await lab.vm.write(0, b"y" * CHUNK)
        await lab.vm.flush()
        await lab.vm.close()
        await lab.cache.close_disk("disk-0", 1)
        assert disk_dir.is_dir()  # kept for a reopen
        await lab.cache.open_disk(lab.order)
        await lab.cache.close_disk("disk-0", 1, discard=Discard.ALWAYS)  # dirty, but told
        assert not disk_dir.exists()
