"""Misses of adjacent chunks go upstream as one read, still one fetch per chunk at once."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from appliance.components.cache.fetching import MISS_RUN
from tests.support.cachelab import KiB, MiB, cache_lab, small_settings

SIZE = 4 * MiB + 12345  # an unaligned tail chunk
CHUNK = 64 * KiB


async def test_a_large_miss_is_one_upstream_read_per_run(tmp_path: Path) -> None:
    content = random.Random(21).randbytes(SIZE)  # no holes: every chunk is fetched
    # A 16 MiB cache: the whole disk fits.
    async with cache_lab(tmp_path, content, small_settings(scale=1 / 256)) as lab:
        disk = lab.cache.disk("disk-0")
        assert await disk.read(MiB + 100, MiB) == content[MiB + 100 : 2 * MiB + 100]
        assert disk.upstream.reads == 1  # 17 chunks, one request
        assert lab.sink.current.reads == 1
        # The whole disk: the chunks not cached yet, in runs of at most MISS_RUN.
        assert await disk.read(0, SIZE) == content
        assert MISS_RUN == 4 * MiB
        # Before the cached run (16 chunks), after it to MISS_RUN (47 + 1 tail chunk).
        assert disk.upstream.reads == 1 + 2
        assert len(disk.store.live) == -(-SIZE // CHUNK)
        reads = disk.upstream.reads
        assert await disk.read(0, SIZE) == content  # all hits now
        assert disk.upstream.reads == reads


async def test_a_run_skips_a_chunk_being_fetched_and_waits_for_that_fetch(
    tmp_path: Path,
) -> None:
    content = random.Random(22).randbytes(SIZE)
    async with cache_lab(tmp_path, content) as lab:
        disk = lab.cache.disk("disk-0")
        served = lab.sink.current
        served.gate = asyncio.Event()
        lone = asyncio.create_task(disk.read(20 * CHUNK + 5, 100))  # chunk 20, held
        await served.read_started.wait()
        served.read_started.clear()
        # Chunks 16..31: 20 is being fetched, so two runs go upstream (16-19, 21-31).
        spanning = asyncio.create_task(disk.read(16 * CHUNK, 16 * CHUNK))
        await served.read_started.wait()  # its claims were all made before its first read
        served.gate.set()
        assert await lone == content[20 * CHUNK + 5 : 20 * CHUNK + 105]
        assert await spanning == content[16 * CHUNK : 32 * CHUNK]
        assert served.reads == 3  # chunk 20 fetched once, by the first reader
        assert set(range(16, 32)) <= disk.store.live.keys()


async def test_a_chunk_written_while_its_run_is_fetched_reads_as_written(
    tmp_path: Path,
) -> None:
    content = random.Random(23).randbytes(SIZE)
    async with cache_lab(tmp_path, content) as lab:
        disk = lab.cache.disk("disk-0")
        served = lab.sink.current
        served.gate = asyncio.Event()
        reader = asyncio.create_task(disk.read(16 * CHUNK, 16 * CHUNK))  # its run is held
        await served.read_started.wait()
        new = b"\x5a" * CHUNK
        await disk.write(20 * CHUNK, new)  # a whole chunk: no fetch, a slot of its own
        served.gate.set()  # the run's old bytes arrive after the write
        expected = content[16 * CHUNK : 20 * CHUNK] + new + content[21 * CHUNK : 32 * CHUNK]
        assert await reader == expected
        assert served.reads == 2  # the overtaken chunk was fetched again on its own
        assert await disk.read(16 * CHUNK, 16 * CHUNK) == expected
        assert served.reads == 2
        assert disk.store.read_slot(disk.store.live[20].slot, 0, CHUNK) == new


async def test_a_failed_run_read_fails_every_waiter_and_releases_its_claims(
    tmp_path: Path,
) -> None:
    content = random.Random(24).randbytes(SIZE)
    async with cache_lab(tmp_path, content) as lab:
        disk = lab.cache.disk("disk-0")
        original = disk.upstream.read
        failures = 0

        async def failing(offset: int, length: int) -> bytes:
            nonlocal failures
            if length > CHUNK and not failures:
                failures += 1
                raise RuntimeError("on-prem said no")
            return await original(offset, length)

        disk.upstream.read = failing  # type: ignore[method-assign]
        try:
            await disk.read(0, 8 * CHUNK)
        except RuntimeError:
            pass
        else:
            raise AssertionError("the failed run read was not reported")
        # The claims were released: a failed claim left behind would fail this read too.
        assert await disk.read(0, 8 * CHUNK) == content[: 8 * CHUNK]
