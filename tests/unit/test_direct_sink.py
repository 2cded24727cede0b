"""DirectEpochSink: the cache's epochs committed by a real I/O manager; an epoch shipped again
after its commit (the reply was lost) lands in a throwaway export and the commit replays."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from appliance.components.cache import shipping
from appliance.components.onprem import OnpremDiskOrder, OnpremIoManager, current_export
from appliance.datapath.nbd import NbdBackend
from appliance.errors import EpochRejected
from appliance.storage.hashing import chunk_hash
from tests.support.direct_sink import DirectEpochSink, onprem_manifest
from tests.support.onprem import CHUNK, MIB, make_lab_disk

SIZE = 2 * MIB
DISK = "disk-s"


def cache_manifest(chunks: dict[int, bytes]) -> shipping.EpochManifest:
    return shipping.EpochManifest.of(
        tuple(
            shipping.ManifestEntry(index * CHUNK, len(data), chunk_hash(data))
            for index, data in sorted(chunks.items())
        )
    )


async def land(sink: DirectEpochSink, epoch: int, chunks: dict[int, bytes]) -> None:
    address, export = await sink.stage(DISK, epoch, 1)
    async with await NbdBackend.connect(address, export) as staged:
        for index, data in chunks.items():
            await staged.write(index * CHUNK, data)
        await staged.flush()


async def test_epochs_commit_and_a_committed_epoch_sent_again_replays(tmp_path: Path) -> None:
    snapshot_id, base = await make_lab_disk(tmp_path / "lab", SIZE, seed=4)
    rng = random.Random(4)
    chunks = {3: rng.randbytes(CHUNK), 7: rng.randbytes(CHUNK)}
    manifest = cache_manifest(chunks)
    assert onprem_manifest(manifest).digest == manifest.digest
    async with OnpremIoManager(tmp_path / "onprem") as manager:
        await manager.open_disk(OnpremDiskOrder("mig-s", DISK, 1, tmp_path / "lab", snapshot_id))
        sink = DirectEpochSink(manager, size=SIZE)
        try:
            await land(sink, 1, chunks)
            await sink.commit(DISK, 1, 1, manifest)
            expected = bytearray(base)
            for index, data in chunks.items():
                expected[index * CHUNK : (index + 1) * CHUNK] = data
            async with await NbdBackend.connect(manager.address, current_export(DISK)) as cur:
                assert await cur.read(0, SIZE) == expected
            # The cache never heard the commit: it ships epoch 1 again.
            await land(sink, 1, chunks)
            assert sink.resent == [(DISK, 1)]
            await sink.commit(DISK, 1, 1, manifest)  # the manager's replay: a no-op
            other = cache_manifest({3: bytes(CHUNK)})
            await land(sink, 1, {3: bytes(CHUNK)})
            with pytest.raises(EpochRejected):  # not the epoch that was committed
                await sink.commit(DISK, 1, 1, other)
            assert manager.committed_epoch(DISK) == 1
            async with await NbdBackend.connect(manager.address, current_export(DISK)) as cur:
                assert await cur.read(0, SIZE) == expected
        finally:
            await sink.close()
