"""Reads through the cloud cache equal the on-prem image: misses fetched once, hits local."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from appliance.components.cache.disk import THREADED_READ
from appliance.components.cache.sizing import CacheSettings, GiB, Profile, cache_bytes
from appliance.storage.extents import Extent
from tests.support.cachelab import KiB, MiB, cache_lab, image_bytes, small_settings

SIZE = 4 * MiB + 12345  # an unaligned tail chunk


async def test_random_reads_equal_onprem_with_misses_and_hits(tmp_path: Path) -> None:
    content = image_bytes(SIZE)
    rng = random.Random(3)
    async with cache_lab(tmp_path, content, small_settings(scale=1 / 256)) as lab:
        for _ in range(300):
            offset = rng.randrange(0, SIZE)
            length = rng.randrange(0, min(300 * KiB, SIZE - offset) + 1)
            assert await lab.vm.read(offset, length) == content[offset : offset + length]
        reads_before = lab.cache.disk("disk-0").upstream.reads
        assert reads_before > 0
        # Everything read so far is cached (16 MiB scaled cache > disk): re-reads are hits.
        assert await lab.vm.read(0, SIZE) == content
        whole_read = lab.cache.disk("disk-0").upstream.reads - reads_before
        assert await lab.vm.read(0, SIZE) == content
        assert lab.cache.disk("disk-0").upstream.reads - reads_before == whole_read


async def test_hits_are_served_inline_and_misses_are_left_to_the_async_path(
    tmp_path: Path,
) -> None:
    content = random.Random(5).randbytes(SIZE)
    async with cache_lab(tmp_path, content) as lab:
        disk = lab.cache.disk("disk-0")
        view = memoryview(bytearray(8 * KiB))
        assert not disk.read_inline(MiB + 100, view)  # a miss: nothing served, nothing fetched
        assert disk.upstream.reads == 0
        assert await disk.read(MiB, 128 * KiB) == content[MiB : MiB + 128 * KiB]
        reads = disk.upstream.reads
        assert disk.read_inline(MiB + 100, view)  # now a hit
        assert bytes(view) == content[MiB + 100 : MiB + 100 + 8 * KiB]
        spanning = memoryview(bytearray(64 * KiB))
        assert disk.read_inline(MiB + 60 * KiB, spanning)  # across a chunk boundary
        assert bytes(spanning) == content[MiB + 60 * KiB : MiB + 124 * KiB]
        assert disk.upstream.reads == reads  # served from the cache
        assert not disk.read_inline(SIZE - 10, view)  # past the end: the async path says so
        assert not disk.write_inline(0, view)  # a partial write to an absent chunk: fetch


async def test_concurrent_misses_on_one_chunk_fetch_once(tmp_path: Path) -> None:
    content = random.Random(11).randbytes(SIZE)  # no holes: every chunk is fetched
    async with cache_lab(tmp_path, content) as lab:
        disk = lab.cache.disk("disk-0")
        served = lab.sink.current
        served.gate = asyncio.Event()
        # Every reader runs to its first wait before the server even sees the one request.
        readers = [asyncio.create_task(disk.read(MiB + 7 + i * 100, 4000 + i)) for i in range(20)]
        await served.read_started.wait()
        served.gate.set()
        results = await asyncio.gather(*readers)
        for i, data in enumerate(results):
            start = MiB + 7 + i * 100
            assert data == content[start : start + 4000 + i]
        assert served.reads == 1
        assert disk.upstream.reads == 1
        assert disk.store.live.keys() == {MiB // (64 * KiB)}


async def test_block_status_reports_onprem_holes(tmp_path: Path) -> None:
    content = bytes(SIZE // 2) + b"\1" * (SIZE - SIZE // 2)
    async with cache_lab(tmp_path, content) as lab:
        extents = await lab.vm.extents(0, SIZE)
        holes = [e for e in extents if e.hole]
        assert holes and holes[0].start == 0
        assert sum(e.length for e in extents) == SIZE
        # A write into the hole shows as data, the rest of the hole stays a hole.
        await lab.vm.write(64 * KiB, b"x" * 512)
        extents = await lab.vm.extents(0, SIZE)
        assert Extent(64 * KiB, 64 * KiB) in extents
        assert extents[0] == Extent(0, 64 * KiB, zero=True, hole=True)
        assert await lab.vm.read(0, 128 * KiB) == bytes(64 * KiB) + b"x" * 512 + bytes(
            64 * KiB - 512
        )
        # Zeroing what is still a hole on-prem costs nothing: no slot, not "written".
        await lab.vm.zero(2 * 64 * KiB, 3 * 64 * KiB)
        assert lab.cache.written_chunks("disk-0") == [1]
        assert lab.cache.disk("disk-0").store.live.keys() == {1}


def test_sizing_rule() -> None:
    tib = 1 << 40
    assert cache_bytes(tib) == int(tib * 0.15)
    assert cache_bytes(tib, profile=Profile.LITE) == int(tib * 0.25)
    assert cache_bytes(tib, working_set=200 * GiB) == 200 * GiB
    assert cache_bytes(10 * GiB) == 3 * GiB
    assert cache_bytes(10 * GiB, profile=Profile.LITE) == 5 * GiB
    assert cache_bytes(10 * GiB, profile=Profile.PERFORMANCE) == 5 * GiB
    assert cache_bytes(10 * GiB, working_set=GiB) == 3 * GiB
    assert cache_bytes(10 * GiB, scale=1 / 1024) == max(int(10 * GiB * 0.15), 3 * 1024 * 1024)
    assert cache_bytes(MiB, scale=1 / 1024) == 3 * MiB
    assert CacheSettings(scale=1 / 1024).slots(MiB) == 48


async def test_a_fetch_overtaken_by_a_write_commit_and_eviction_is_not_kept(
    tmp_path: Path,
) -> None:
    content = random.Random(17).randbytes(SIZE)
    chunk = 64 * KiB
    async with cache_lab(tmp_path, content) as lab:
        disk = lab.cache.disk("disk-0")
        served = lab.sink.current
        served.gate = asyncio.Event()
        reader = asyncio.create_task(disk.read(5 * chunk, 100))  # its fetch is held
        await served.read_started.wait()
        new = b"\x42" * chunk
        await disk.write(5 * chunk, new)  # a whole chunk: no fetch needed
        epoch = await lab.cache.cut_epoch("disk-0", 1)
        await lab.cache.wait_committed("disk-0", epoch)
        assert disk.store.evict(lambda c: False)  # clean now: the only cached chunk goes
        await disk.store.sync()
        assert 5 not in disk.store.live
        served.gate.set()  # the old content arrives late
        assert await reader in (content[5 * chunk : 5 * chunk + 100], new[:100])
        assert await disk.read(5 * chunk, chunk) == new
        assert served.reads == 2  # the stale answer was fetched again


async def test_read_hits_and_misses_are_counted_per_chunk_piece_on_every_path(
    tmp_path: Path,
) -> None:
    content = random.Random(13).randbytes(SIZE)  # no holes: every first read is a miss
    async with cache_lab(tmp_path, content) as lab:
        disk = lab.cache.disk("disk-0")
        chunk = disk.store.geometry.chunk_size
        assert await disk.read(0, 2 * chunk) == content[: 2 * chunk]  # two pieces fetched
        assert (disk.read_hits, disk.read_misses) == (0, 2)
        assert await disk.read(chunk, 2 * chunk) == content[chunk : 3 * chunk]  # hit, miss
        assert (disk.read_hits, disk.read_misses) == (1, 3)
        view = memoryview(bytearray(chunk + 10))
        assert disk.read_inline(chunk - 5, view)  # inline: pieces of chunks 0, 1 and 2
        assert (disk.read_hits, disk.read_misses) == (4, 3)
        assert not disk.read_inline(3 * chunk, view)  # not served inline: not counted
        assert (disk.read_hits, disk.read_misses) == (4, 3)
        assert await disk.read(3 * chunk, chunk) == content[3 * chunk : 4 * chunk]
        assert (disk.read_hits, disk.read_misses) == (4, 4)
        assert 4 * chunk >= THREADED_READ  # all cached and large: the threaded path
        assert await disk.read(0, 4 * chunk) == content[: 4 * chunk]
        assert (disk.read_hits, disk.read_misses) == (8, 4)
        assert disk.upstream.reads == 3  # the first two misses, adjacent: one upstream read
