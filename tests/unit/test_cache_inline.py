"""The cache's fast paths: inline writes, group-committed flushes, large hits read in a
worker thread with their slots pinned."""

from __future__ import annotations

import asyncio
import random
import threading
from pathlib import Path

from appliance.components.cache.journal import Record
from appliance.components.cache.store import CacheStore
from tests.support.cachelab import KiB, MiB, cache_lab, image_bytes, small_settings

SIZE = 4 * MiB + 12345
CHUNK = 64 * KiB


async def test_inline_writes_in_place_or_copy_on_write_and_never_touch_a_held_slot(
    tmp_path: Path,
) -> None:
    content = image_bytes(SIZE, seed=3)
    model = bytearray(content)
    async with cache_lab(tmp_path, content, small_settings(scale=1 / 256)) as lab:
        disk = lab.cache.disk("disk-0")
        store = disk.store
        # A partial write to a chunk not cached needs a fetch: left to the async path.
        assert not disk.write_inline(2 * CHUNK + 100, memoryview(b"x" * 4096))
        assert 2 not in store.live
        # Cached clean: copied on write into a fresh slot, inline.
        assert await disk.read(2 * CHUNK, CHUNK) == content[2 * CHUNK : 3 * CHUNK]
        clean_slot = store.live[2].slot
        assert disk.write_inline(2 * CHUNK + 100, memoryview(b"a" * 4096))
        model[2 * CHUNK + 100 : 2 * CHUNK + 4196] = b"a" * 4096
        dirty_slot = store.live[2].slot
        assert dirty_slot != clean_slot
        assert store.live[2].epoch == store.open_epoch
        # Dirty in the open epoch: in place.
        assert disk.write_inline(2 * CHUNK + 8000, memoryview(b"b" * 4096))
        model[2 * CHUNK + 8000 : 2 * CHUNK + 12096] = b"b" * 4096
        assert store.live[2].slot == dirty_slot
        # A whole chunk needs nothing from on-prem; across two dirty chunks works too.
        assert disk.write_inline(5 * CHUNK, memoryview(b"c" * CHUNK))
        model[5 * CHUNK : 6 * CHUNK] = b"c" * CHUNK
        assert disk.write_inline(6 * CHUNK - 10, memoryview(b"d" * 20)) is False  # 6: absent
        assert disk.write_inline(3 * CHUNK - 10, memoryview(b"d" * 20)) is False  # 3: absent
        assert await disk.read(0, SIZE) == model
        # Cut: chunk 2 is held by the epoch; a later write copies it, the held slot stays.
        epoch_content = bytes(model)
        lab.sink.commit_gate = asyncio.Event()  # the epoch stays in flight
        epoch = await disk.cut_epoch()
        held_slot = store.held[epoch][2]
        assert disk.write_inline(2 * CHUNK, memoryview(b"e" * 4096))
        model[2 * CHUNK : 2 * CHUNK + 4096] = b"e" * 4096
        assert store.live[2].slot != held_slot
        assert store.read_slot(held_slot, 0, CHUNK) == epoch_content[2 * CHUNK : 3 * CHUNK]
        assert await lab.vm.read(0, SIZE) == model
        lab.sink.commit_gate.set()
        await lab.cache.wait_committed("disk-0", epoch)
        assert lab.sink.read_image() == epoch_content


async def test_inline_writes_are_journaled_at_flush(tmp_path: Path) -> None:
    content = image_bytes(SIZE, seed=4)
    model = bytearray(content)
    rng = random.Random(4)
    cache_dir = tmp_path / "cache"
    async with cache_lab(
        tmp_path, content, small_settings(scale=1 / 256), cache_dir=cache_dir
    ) as lab:
        disk = lab.cache.disk("disk-0")
        assert await lab.vm.read(0, SIZE) == content  # every chunk cached, clean
        for _ in range(200):
            offset = rng.randrange(0, SIZE // 4096) * 4096
            data = rng.randbytes(4096)
            assert disk.write_inline(offset, memoryview(data))
            model[offset : offset + 4096] = data
        await disk.flush()
        written = set(disk.store.written_chunks())
    store = CacheStore.open(cache_dir / "disks" / "mig-1" / "disk-0", SIZE, CHUNK, 1)
    try:
        assert set(store.written_chunks()) == written
        for chunk, entry in store.live.items():
            length = min(CHUNK, SIZE - chunk * CHUNK)
            data = store.read_slot(entry.slot, 0, length)
            assert data == model[chunk * CHUNK : chunk * CHUNK + length]
    finally:
        store.close()


class GatedStore(CacheStore):
    """A real store whose device sync waits at ``gate`` (set by the test)."""

    gate: threading.Event
    entered: threading.Event

    def _sync_blocking(self, batch: list[Record], image: list[Record] | None) -> None:
        self.entered.set()
        self.gate.wait(30)
        super()._sync_blocking(batch, image)


async def test_flushes_share_a_sync_and_a_write_during_a_sync_gets_its_own(
    tmp_path: Path,
) -> None:
    store = GatedStore.open(tmp_path / "store", 1 * MiB, CHUNK, 8)
    store.gate, store.entered = threading.Event(), threading.Event()
    try:
        store.gate.set()
        await store.sync()
        assert store.syncs == 0  # nothing changed: no system call
        slot = store.allocate()
        assert slot is not None
        store.write_slot(slot, 0, b"1" * CHUNK)
        store.map(0, slot, store.open_epoch)
        store.gate.clear()
        first = asyncio.create_task(store.sync())
        await asyncio.to_thread(store.entered.wait, 30)
        # While the first sync is at the device: a write, then flushes that all need it.
        store.write_slot(slot, 0, b"2" * CHUNK)
        waiting = [asyncio.create_task(store.sync()) for _ in range(8)]
        store.gate.set()
        await asyncio.gather(first, *waiting)
        assert store.syncs == 2  # the first one, and one shared by the eight
        await asyncio.gather(*(store.sync() for _ in range(4)))
        assert store.syncs == 2
    finally:
        store.close()


async def test_a_pinned_slot_is_not_reused_until_unpinned(tmp_path: Path) -> None:
    store = CacheStore.open(tmp_path / "store", 1 * MiB, CHUNK, 4)
    try:
        slot = store.allocate()
        assert slot is not None
        store.write_slot(slot, 0, b"p" * CHUNK)
        store.map(7, slot, 0)  # clean
        await store.sync()
        store.pin(slot)  # a worker thread reads it
        assert store.evict(lambda chunk: False)
        await store.sync()
        free = [store.allocate() for _ in range(store.free_slots)]
        assert slot not in free
        for other in free:
            assert other is not None
            store.unused(other)
        store.unpin(slot)
        await store.sync()
        assert slot in [store.allocate() for _ in range(store.free_slots)]
    finally:
        store.close()


async def test_large_reads_of_cached_data_equal_the_disk(tmp_path: Path) -> None:
    content = image_bytes(SIZE, seed=8)
    model = bytearray(content)
    async with cache_lab(tmp_path, content, small_settings(scale=1 / 256)) as lab:
        disk = lab.cache.disk("disk-0")
        assert await lab.vm.read(0, SIZE) == content  # slots in chunk order: merged reads
        reads = disk.upstream.reads
        rng = random.Random(8)
        for round_ in range(2):
            for _ in range(20):
                offset = rng.randrange(0, SIZE - MiB)
                length = rng.randrange(256 * KiB, MiB)
                assert await disk.read(offset, length) == model[offset : offset + length]
            # Rewritten chunks move to fresh slots: the next reads mix runs and strays.
            for _ in range(12 * (1 - round_)):
                offset = rng.randrange(0, SIZE - 4096)
                await disk.write(offset, b"w" * 4096)
                model[offset : offset + 4096] = b"w" * 4096
        assert disk.upstream.reads == reads  # all hits, read in a worker thread
