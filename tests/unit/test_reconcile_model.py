"""Reconcile passes against a model, over random runs of what a warm migration goes through:
guest writes and zeroes (some while a pass copies), epochs cut and committed, committed
chunks evicted by reads, passes cut short by a restart of the cache. After every pass, the
chunks it copied are exactly those written since the previous pass's mark (with the
chunks of a pass cut short before it); after the guest stops and a last pass, the volume
is the guest's disk byte for byte.
"""

from __future__ import annotations

import asyncio
import random
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest

from appliance.components.cache.reconcile import PassResult
from tests.support.cachelab import DISK, CacheLab, KiB, MiB, cache_lab, image_bytes
from tests.support.volumes import ServedVolume, served_volume

SIZE = 3 * MiB + 777
CHUNK = 64 * KiB


def chunks_of(offset: int, length: int) -> range:
    return range(offset // CHUNK, (offset + length - 1) // CHUNK + 1)


class Run:
    def __init__(self, tmp_path: Path, content: bytes, volume: ServedVolume, seed: int) -> None:
        self._tmp_path = tmp_path
        self._content = content
        self._opened: AbstractAsyncContextManager[CacheLab] | None = None
        self._lab: CacheLab | None = None
        self.volume = volume
        self.rng = random.Random(seed)
        self.model = bytearray(content)
        self.ever_written: set[int] = set()
        self.since_mark: set[int] = set()
        """Chunks written since the last mark (the next pass's)."""
        self.unfinished: set[int] = set()
        """Chunks of a pass cut short (the next pass copies them too)."""
        self.passes = 0

    @property
    def lab(self) -> CacheLab:
        assert self._lab is not None
        return self._lab

    async def open(self) -> None:
        self._opened = cache_lab(self._tmp_path, self._content)
        self._lab = await self._opened.__aenter__()

    async def close(self) -> None:
        if self._opened is not None:
            opened, self._opened = self._opened, None
            await opened.__aexit__(None, None, None)

    def _hole(self, chunk: int) -> bool:
        """A chunk the cache knows as a hole on-prem: zeroing it writes nothing."""
        data = self._content[chunk * CHUNK : (chunk + 1) * CHUNK]
        return chunk not in self.ever_written and data.count(0) == len(data)

    async def write(self, count: int, written: set[int]) -> None:
        for _ in range(count):
            offset = self.rng.randrange(0, SIZE - 1)
            length = min(self.rng.choice([1, 512, 4096, CHUNK, 3 * CHUNK + 5]), SIZE - offset)
            touched = set(chunks_of(offset, length))
            if self.rng.random() < 0.2:
                touched = {c for c in touched if not self._hole(c)}
                await self.lab.vm.zero(offset, length)
                data = bytes(length)
            else:
                data = self.rng.randbytes(length)
                await self.lab.vm.write(offset, data)
            self.model[offset : offset + length] = data
            written |= touched
            self.ever_written |= touched

    async def commit(self) -> None:
        epoch = await self.lab.cache.cut_epoch(DISK, 1)
        await self.lab.cache.wait_committed(DISK, epoch)

    def _start_pass(self) -> tuple[asyncio.Task[PassResult], asyncio.Event]:
        self.passes += 1
        backend = self.volume.backend
        backend.writes.clear()
        backend.write_started.clear()
        gate = backend.gate = asyncio.Event()
        running = asyncio.create_task(
            self.lab.cache.reconcile(DISK, 1, self.passes, self.volume.target)
        )
        return running, gate

    async def a_pass(self, *, writes_during: int) -> None:
        """A pass; the guest writes ``writes_during`` times while it copies."""
        expected = self.since_mark | self.unfinished
        running, gate = self._start_pass()
        during: set[int] = set()
        if expected:
            await self.volume.backend.write_started.wait()
            await self.write(writes_during, during)
        gate.set()
        result = await running
        self.volume.backend.gate = None
        assert self.volume.backend.chunks_written(CHUNK) == expected
        assert result.chunks == len(expected) and result.remainder_chunks == len(during)
        self.since_mark, self.unfinished = during, set()

    async def a_pass_cut_short(self) -> None:
        """A pass stopped in the middle by a restart of the cache (written writes flushed)."""
        self.unfinished |= self.since_mark
        self.since_mark = set()
        running, gate = self._start_pass()
        if not self.unfinished:
            gate.set()
            await running
            return
        await self.volume.backend.write_started.wait()
        await self.write(self.rng.randrange(0, 4), self.since_mark)
        await self.lab.vm.flush()
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        await self.close()
        self.volume.backend.gate = None
        gate.set()
        await self.volume.backend.settled()
        await self.open()


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
async def test_random_runs_copy_exactly_what_was_written_since_each_mark(
    tmp_path: Path, seed: int
) -> None:
    content = image_bytes(SIZE, seed=seed)
    async with served_volume(tmp_path / "volume.raw", content) as volume:
        run = Run(tmp_path, content, volume, seed)
        await run.open()
        try:
            for _ in range(14):
                step = run.rng.choice(["write", "write", "commit", "evict", "pass", "short"])
                if step == "write":
                    await run.write(run.rng.randrange(1, 12), run.since_mark)
                elif step == "commit":
                    await run.commit()
                elif step == "evict":
                    assert await run.lab.vm.read(0, SIZE) == run.model
                elif step == "pass":
                    await run.a_pass(writes_during=run.rng.randrange(0, 6))
                else:
                    await run.a_pass_cut_short()
            await run.a_pass(writes_during=0)  # the guest has stopped: the last pass
            assert run.since_mark == set() and run.passes > 1
            assert volume.read() == run.model == await run.lab.vm.read(0, SIZE)
        finally:
            await run.close()
