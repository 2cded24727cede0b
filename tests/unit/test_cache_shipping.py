"""The shipper's view of a cut epoch: reads straight into the data path's buffers."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from appliance.components.cache.shipping import EpochView
from appliance.datapath.checkpoint import MemoryCheckpointStore
from appliance.datapath.transfer import Transfer, TransferOptions
from appliance.storage.memory import MemoryBackend
from tests.support.cachelab import KiB, MiB, cache_lab, image_bytes, small_settings

SIZE = 4 * MiB + 12345
CHUNK = 64 * KiB


async def test_an_epoch_view_reads_into_a_buffer_as_it_reads(tmp_path: Path) -> None:
    content = image_bytes(SIZE)
    rng = random.Random(31)
    async with cache_lab(tmp_path, content, small_settings(scale=1 / 256)) as lab:
        lab.sink.stage_gate = asyncio.Event()  # the epoch stays held, unshipped
        writes = {0: rng.randbytes(CHUNK), 5: rng.randbytes(CHUNK), 6: rng.randbytes(CHUNK)}
        for chunk, data in writes.items():
            await lab.vm.write(chunk * CHUNK, data)
        await lab.vm.write(SIZE - 100, b"t" * 100)  # the clipped last chunk
        epoch = await lab.cache.cut_epoch("disk-0", 1)
        await lab.sink.staged.wait()
        view = EpochView(lab.cache.disk("disk-0").store, epoch)
        expected = bytearray(SIZE)  # the epoch's chunks; holes elsewhere
        for chunk, data in writes.items():
            expected[chunk * CHUNK : (chunk + 1) * CHUNK] = data
        last = SIZE // CHUNK
        expected[last * CHUNK :] = content[last * CHUNK : SIZE - 100] + b"t" * 100
        for offset, length in [(0, SIZE), (100, 7 * CHUNK), (5 * CHUNK + 3, 10), (SIZE - 7, 7)]:
            into = bytearray(length)  # 7 chunks and more: read in a thread
            await view.read_into(offset, into)
            assert into == expected[offset : offset + length]
            assert await view.read(offset, length) == expected[offset : offset + length]
        # The manifest from what a transfer of the view hashed equals the one hashed afresh.
        checkpoint = MemoryCheckpointStore()
        target = MemoryBackend(SIZE)
        options = TransferOptions(chunk_size=CHUNK, whole_image_check=False)
        extents = view.chunk_extents()
        transfer = Transfer(
            "t", view, target, checkpoints=checkpoint, extents=extents, options=options
        )
        await transfer.run()
        assert view.manifest_from(checkpoint.records) == view.manifest()
        assert len(view.manifest().entries) == len(writes) + 1
        del checkpoint.records[5]
        assert view.manifest_from(checkpoint.records) is None  # a chunk not sent: no manifest
        lab.sink.stage_gate.set()
        await lab.cache.wait_committed("disk-0", epoch)
        assert lab.sink.read_image() == apply_writes(content, writes, SIZE)


def apply_writes(content: bytes, writes: dict[int, bytes], size: int) -> bytes:
    image = bytearray(content)
    for chunk, data in writes.items():
        image[chunk * CHUNK : (chunk + 1) * CHUNK] = data
    image[size - 100 :] = b"t" * 100
    return bytes(image)
