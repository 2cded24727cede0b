"""What bounds the data path's memory when many migrations run at once."""

from __future__ import annotations

import asyncio
import random

from appliance.datapath.buffers import BufferBudget, BufferPool
from appliance.datapath.nbd.checksums import range_digests
from appliance.storage.hashing import chunk_hash
from appliance.storage.memory import MemoryBackend

MIB = 1024 * 1024


async def test_a_budget_never_owns_more_than_its_slots_whatever_the_sizes_asked() -> None:
    budget = BufferBudget(2, 4 * MIB)
    owned: set[int] = set()

    async def work(length: int) -> None:
        async with budget.hold(length) as view:
            assert len(view) == length
            owned.add(id(view.obj))
            view[:] = bytes(length)  # written over while held
            await asyncio.sleep(0)

    # Small chunks first, then whole runs: a pool of the sizes asked for would keep the
    # small buffers idle and allocate new large ones beside them.
    for lengths in ([MIB, MIB], [4 * MIB, 4 * MIB], [64 * 1024, 3 * MIB], [4 * MIB, MIB]):
        await asyncio.gather(*(work(length) for length in lengths))
    assert len(owned) == 2


class RecordingPool(BufferPool):
    def __init__(self) -> None:
        super().__init__()
        self.taken: list[int] = []

    def take(self, length: int) -> bytearray:
        self.taken.append(length)
        return super().take(length)


async def test_block_digests_of_a_long_range_hold_one_block_at_a_time() -> None:
    data = random.Random(5).randbytes(8 * MIB + 12345)
    backend = MemoryBackend.from_bytes(data)
    pool = RecordingPool()
    digests = await range_digests(backend, 0, len(data), MIB, pool)
    assert digests == [chunk_hash(data[at : at + MIB]) for at in range(0, len(data), MIB)]
    assert max(pool.taken) <= MIB  # not the whole 8 MiB range at once
    # And from an unaligned offset, the last block clipped.
    digests = await range_digests(backend, 4097, 3 * MIB, MIB, pool)
    assert digests == [chunk_hash(data[at : at + MIB]) for at in range(4097, 4097 + 3 * MIB, MIB)]
