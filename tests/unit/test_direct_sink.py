"""DirectEpochSink: the cache's epochs committed by a real I/O manager; an epoch staged again
after its commit (the reply was lost) is refused with EpochOutOfOrder, and its commit replays."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from appliance.components.cache import shipping
from appliance.components.onprem import OnpremDiskOrder, OnpremIoManager, current_export
from appliance.datapath.nbd import NbdBackend
from appliance.errors import EpochOutOfOrder, EpochRejected
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


async def test_epochs_commit_and_a_committed_epoch_staged_again_replays(tmp_path: Path) -> None:
    snapshot_id, base = await make_lab_disk(tmp_path / "lab", SIZE, seed=4)
    rng = random.Random(4)
    chunks = {3: rng.randbytes(CHUNK), 7: rng.randbytes(CHUNK)}
    manifest = cache_manifest(chunks)
    assert onprem_manifest(manifest).digest == manifest.digest
    async with OnpremIoManager(tmp_path / "onprem") as manager:
        await manager.open_disk(OnpremDiskOrder("mig-s", DISK, 1, tmp_path / "lab", snapshot_id))
        sink = DirectEpochSink(manager)
        address, export = await sink.stage(DISK, 1, 1)
        async with await NbdBackend.connect(address, export) as staged:
            for index, data in chunks.items():
                await staged.write(index * CHUNK, data)
            await staged.flush()
        await sink.commit(DISK, 1, 1, manifest)
        expected = bytearray(base)
        for index, data in chunks.items():
            expected[index * CHUNK : (index + 1) * CHUNK] = data
        # The cache never heard the commit: it asks to stage epoch 1 again.
        with pytest.raises(EpochOutOfOrder) as refused:
            await sink.stage(DISK, 1, 1)
        assert refused.value.expected == 2
        assert sink.already_committed == [(DISK, 1)]
        await sink.commit(DISK, 1, 1, manifest)  # the manager's replay: a no-op
        with pytest.raises(EpochRejected):  # not the epoch that was committed
            await sink.commit(DISK, 1, 1, cache_manifest({3: bytes(CHUNK)}))
        assert manager.committed_epoch(DISK) == 1
        async with await NbdBackend.connect(manager.address, current_export(DISK)) as cur:
            assert await cur.read(0, SIZE) == expected
