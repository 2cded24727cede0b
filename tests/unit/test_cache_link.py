"""Link faults between the cache and on-prem: an outage mid-epoch resumes, a damaged chunk
is detected by the hashed write and sent again; a miss during an outage waits, not fails."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from tests.support.cachelab import KiB, MiB, cache_lab, image_bytes, small_settings

SIZE = 4 * MiB


async def test_link_dropped_mid_epoch_then_back_resumes_and_commits(tmp_path: Path) -> None:
    content = image_bytes(SIZE, seed=31)
    model = bytearray(content)
    data = random.Random(2).randbytes(2 * MiB)
    async with cache_lab(tmp_path, content, small_settings(scale=1 / 256)) as lab:
        shipper = lab.cache._opened("disk-0").shipper
        await lab.vm.write(MiB, data)
        model[MiB : 3 * MiB] = data
        lab.proxy.drop_after(600 * KiB)  # the link dies part way through the epoch...
        lab.proxy.drop_every(0)  # ...and stays down
        epoch = await lab.cache.cut_epoch("disk-0", 1)
        await shipper.failed.wait()
        shipper.failed.clear()
        await shipper.failed.wait()  # still down: a second attempt failed too
        assert lab.sink.read_image() == content
        lab.proxy.drop_every(None)  # the link is back
        await lab.cache.wait_committed("disk-0", epoch)
        assert lab.sink.read_image() == model
        assert lab.proxy.drops >= 1


async def test_miss_during_outage_waits_for_the_link(tmp_path: Path) -> None:
    content = random.Random(3).randbytes(SIZE)
    async with cache_lab(tmp_path, content) as lab:
        lab.proxy.drop_every(0)
        lab.proxy.drop_now()
        upstream = lab.cache.disk("disk-0").upstream
        reader = asyncio.create_task(lab.vm.read(2 * MiB + 5, 70 * KiB))
        for _ in range(3):  # attempts keep failing on the dead link
            await upstream.retrying.wait()
            upstream.retrying.clear()
        assert not reader.done()
        lab.proxy.drop_every(None)
        assert await reader == content[2 * MiB + 5 : 2 * MiB + 5 + 70 * KiB]


async def test_chunk_damaged_on_the_link_is_detected_and_resent(tmp_path: Path) -> None:
    content = image_bytes(SIZE, seed=41)
    model = bytearray(content)
    data = random.Random(4).randbytes(MiB)
    async with cache_lab(tmp_path, content) as lab:
        proxy = lab.proxy
        shipper = lab.cache._opened("disk-0").shipper
        await lab.vm.write(MiB, data)
        model[MiB : 2 * MiB] = data
        lab.sink.stage_gate = asyncio.Event()
        epoch = await lab.cache.cut_epoch("disk-0", 1)
        await lab.sink.staged.wait()
        proxy.corrupt_once_after(100_000)  # inside the epoch's 1 MiB write payload
        lab.sink.stage_gate.set()
        await lab.cache.wait_committed("disk-0", epoch)
        assert proxy.corrupted == 1
        assert shipper.mismatches >= 1
        assert lab.sink.read_image() == model
