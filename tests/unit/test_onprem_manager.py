"""The on-prem I/O manager with real files, a real NbdServer and the project's NBD client."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest

from appliance.components.onprem import (
    EpochManifest,
    ManifestEntry,
    OnpremDiskOrder,
    OnpremIoManager,
    current_export,
    read_journal,
    snapshot_export,
)
from appliance.datapath.nbd import NbdBackend, NbdClient, TcpAddress
from appliance.errors import (
    DiskNotOpen,
    EpochOutOfOrder,
    EpochRejected,
    NbdProtocolError,
    OrderConflict,
    StaleToken,
    UnsafeName,
)
from appliance.storage.backend import Backend
from appliance.storage.hashing import chunk_hash
from appliance.storage.layered import LayeredDisk
from tests.support.faultproxy import FaultProxy
from tests.support.onprem import (
    CHUNK,
    MIB,
    apply_to,
    make_lab_disk,
    random_epoch,
    ship,
)

SIZE = 2 * MIB
DISK = "disk-0"


async def read_export(manager: OnpremIoManager, export: str) -> bytes:
    async with await NbdBackend.connect(manager.address, export) as backend:
        return await backend.read(0, backend.size)


@pytest.fixture
async def lab(tmp_path: Path) -> tuple[OnpremDiskOrder, bytes]:
    snapshot_id, content = await make_lab_disk(tmp_path / "lab-disk", SIZE)
    order = OnpremDiskOrder("mig-1", DISK, 7, tmp_path / "lab-disk", snapshot_id)
    return order, content


async def test_exports_serve_the_snapshot_and_the_current_image_with_holes(
    tmp_path: Path, lab: tuple[OnpremDiskOrder, bytes]
) -> None:
    order, snapshot = lab
    # On-prem writes after the snapshot: cur/ must show them, snap/ must not.
    later = bytearray(snapshot)
    later[CHUNK : CHUNK + 5000] = b"\x42" * 5000
    async with await LayeredDisk.open(order.disk_dir) as disk:
        await disk.active().write(CHUNK, b"\x42" * 5000)
    async with OnpremIoManager(tmp_path / "onprem") as manager:
        await manager.open_disk(order)
        assert await read_export(manager, snapshot_export(DISK)) == snapshot
        assert await read_export(manager, current_export(DISK)) == bytes(later)
        async with await NbdBackend.connect(manager.address, snapshot_export(DISK)) as snap:
            assert snap.readonly
            extents = await snap.extents()
            with pytest.raises(PermissionError):
                await snap.write(0, b"x")
        holes = [extent for extent in extents if extent.hole]
        assert holes, extents
        for extent in holes:
            assert snapshot[extent.start : extent.end].count(0) == extent.length
        status = manager.status()
        assert status.exports == (current_export(DISK), snapshot_export(DISK))
        assert status.committed_epochs == {DISK: 0}
        assert status.epochs_staged == {DISK: ()}


async def test_an_epoch_shipped_with_hashed_writes_commits_exactly(
    tmp_path: Path, lab: tuple[OnpremDiskOrder, bytes]
) -> None:
    order, snapshot = lab
    epoch = {
        0: random.Random(1).randbytes(CHUNK),
        5: bytes(CHUNK),
        SIZE // CHUNK - 1: b"\x07" * CHUNK,
    }
    async with OnpremIoManager(tmp_path / "onprem") as manager:
        await manager.open_disk(order)
        manifest, result = await ship(manager, DISK, 1, order.token, SIZE, epoch)
        assert result.stats.chunks_verified_on_write == 2  # the two data chunks
        assert manager.status().epochs_staged == {DISK: (1,)}
        # Invisible until committed.
        assert await read_export(manager, current_export(DISK)) == snapshot
        await manager.commit_epoch(DISK, 1, order.token, manifest)
        assert await read_export(manager, current_export(DISK)) == apply_to(snapshot, epoch)
        assert await read_export(manager, snapshot_export(DISK)) == snapshot
        assert manager.committed_epoch(DISK) == 1
        assert manager.journal_state(DISK).committed_prefix
        assert manager.status().epochs_staged == {DISK: ()}
        assert not list((tmp_path / "onprem" / "disks" / DISK).glob("stage-*"))


class CorruptingLink:
    """The staging export behind a link that flips a byte of the first hashed write."""

    def __init__(self, backend: NbdBackend) -> None:
        self._backend = backend
        self.corrupted = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._backend, name)

    async def write_verified(self, offset: int, data: bytes | memoryview) -> bytes | None:
        payload = bytes(data)
        if not self.corrupted:
            self.corrupted += 1
            payload = bytes([payload[0] ^ 0xFF]) + payload[1:]
        return await self._backend.write_verified(offset, payload)


async def test_a_chunk_corrupted_on_the_link_is_caught_as_it_lands_and_sent_again(
    tmp_path: Path, lab: tuple[OnpremDiskOrder, bytes]
) -> None:
    order, snapshot = lab
    epoch = {2: random.Random(2).randbytes(CHUNK), 3: random.Random(3).randbytes(CHUNK)}
    links: list[CorruptingLink] = []

    def wrap(backend: NbdBackend) -> Backend:
        links.append(CorruptingLink(backend))
        return links[-1]  # type: ignore[return-value]

    async with OnpremIoManager(tmp_path / "onprem") as manager:
        await manager.open_disk(order)
        manifest, result = await ship(manager, DISK, 1, order.token, SIZE, epoch, wrap=wrap)
        assert links[0].corrupted == 1
        assert result.stats.mismatches == 1
        await manager.commit_epoch(DISK, 1, order.token, manifest)
        assert await read_export(manager, current_export(DISK)) == apply_to(snapshot, epoch)


async def test_a_link_dropped_mid_epoch_resumes_into_the_same_staging(
    tmp_path: Path, lab: tuple[OnpremDiskOrder, bytes]
) -> None:
    order, snapshot = lab
    rng = random.Random(8)
    epoch = {index: rng.randbytes(CHUNK) for index in range(0, SIZE // CHUNK, 2)}
    async with OnpremIoManager(tmp_path / "onprem") as manager:
        await manager.open_disk(order)
        assert isinstance(manager.address, TcpAddress)
        async with FaultProxy(manager.address.host, manager.address.port) as proxy:
            proxy.drop_after(len(epoch) * CHUNK // 2)
            via = TcpAddress("127.0.0.1", proxy.port)
            manifest, result = await ship(manager, DISK, 1, order.token, SIZE, epoch, via=via)
        assert proxy.drops >= 1 and result.stats.retries >= 1
        await manager.commit_epoch(DISK, 1, order.token, manifest)
        assert await read_export(manager, current_export(DISK)) == apply_to(snapshot, epoch)


async def test_a_manifest_that_disagrees_with_the_staged_bytes_refuses_the_commit(
    tmp_path: Path, lab: tuple[OnpremDiskOrder, bytes]
) -> None:
    order, snapshot = lab
    epoch = {1: random.Random(4).randbytes(CHUNK), 9: random.Random(5).randbytes(CHUNK)}
    async with OnpremIoManager(tmp_path / "onprem") as manager:
        await manager.open_disk(order)
        manifest, _ = await ship(manager, DISK, 1, order.token, SIZE, epoch)
        wrong_hash = EpochManifest.build(
            [manifest.entries[0], replace(manifest.entries[1], hash=chunk_hash(b"other"))]
        )
        missing = EpochManifest.build(manifest.entries[:1])  # chunk 9 landed outside it
        bad_digest = EpochManifest(manifest.entries, bytes(16))
        for wrong in (wrong_hash, missing, bad_digest):
            with pytest.raises(EpochRejected) as refused:
                await manager.commit_epoch(DISK, 1, order.token, wrong)
            assert refused.value.epoch == 1
            assert await read_export(manager, current_export(DISK)) == snapshot
            assert manager.committed_epoch(DISK) == 0
        assert read_journal(manager.journal_path(DISK)).committed_epoch == 0
        # The staging is kept and open again: the right manifest commits.
        await manager.commit_epoch(DISK, 1, order.token, manifest)
        assert await read_export(manager, current_export(DISK)) == apply_to(snapshot, epoch)


async def test_bytes_changed_in_staging_without_a_resend_refuse_the_commit(
    tmp_path: Path, lab: tuple[OnpremDiskOrder, bytes]
) -> None:
    order, snapshot = lab
    epoch = {4: random.Random(6).randbytes(CHUNK)}
    async with OnpremIoManager(tmp_path / "onprem") as manager:
        await manager.open_disk(order)
        manifest, _ = await ship(manager, DISK, 1, order.token, SIZE, epoch)
        address, export = await manager.stage_export(DISK, 1, order.token)
        async with await NbdClient.connect(address, export) as client:
            await client.write(4 * CHUNK + 100, b"\x00\x01")  # plain write: nobody checks it
            await client.flush()
        with pytest.raises(EpochRejected):
            await manager.commit_epoch(DISK, 1, order.token, manifest)
        assert await read_export(manager, current_export(DISK)) == snapshot
        # Refused, not lost: the sender sends the chunk again and the commit goes through.
        async with await NbdBackend.connect(address, export) as staged:
            await staged.write(4 * CHUNK, epoch[4])
            await staged.flush()
        await manager.commit_epoch(DISK, 1, order.token, manifest)
        assert await read_export(manager, current_export(DISK)) == apply_to(snapshot, epoch)


async def test_a_stale_token_is_refused_everywhere_and_changes_nothing(
    tmp_path: Path, lab: tuple[OnpremDiskOrder, bytes]
) -> None:
    order, snapshot = lab
    epoch = {6: random.Random(7).randbytes(CHUNK)}
    async with OnpremIoManager(tmp_path / "onprem") as manager:
        await manager.open_disk(order)
        manifest, _ = await ship(manager, DISK, 1, order.token + 1, SIZE, epoch)  # a newer owner
        for stale in (
            manager.commit_epoch(DISK, 1, order.token, manifest),
            manager.stage_export(DISK, 2, order.token),
            manager.close_disk(DISK, order.token),
            manager.open_disk(order),
        ):
            with pytest.raises(StaleToken) as refused:
                await stale
            assert (refused.value.token, refused.value.highest) == (order.token, order.token + 1)
        assert await read_export(manager, current_export(DISK)) == snapshot
        assert manager.committed_epoch(DISK) == 0
        assert manager.status().disks[0].token == order.token + 1
    # The highest token survives a restart.
    async with OnpremIoManager(tmp_path / "onprem") as manager:
        with pytest.raises(StaleToken):
            await manager.open_disk(order)
        await manager.open_disk(replace(order, token=order.token + 1))
        assert manager.committed_epoch(DISK) == 0
        assert await read_export(manager, current_export(DISK)) == snapshot


async def test_epochs_commit_strictly_in_order_and_a_replay_is_a_no_op(
    tmp_path: Path, lab: tuple[OnpremDiskOrder, bytes]
) -> None:
    order, snapshot = lab
    first = {0: b"\x01" * CHUNK}
    second = {0: b"\x02" * CHUNK, 1: b"\x03" * CHUNK}
    async with OnpremIoManager(tmp_path / "onprem") as manager:
        await manager.open_disk(order)
        one, _ = await ship(manager, DISK, 1, order.token, SIZE, first)
        two, _ = await ship(manager, DISK, 2, order.token, SIZE, second)
        assert manager.status().epochs_staged == {DISK: (1, 2)}
        with pytest.raises(EpochOutOfOrder) as gap:
            await manager.commit_epoch(DISK, 2, order.token, two)
        assert (gap.value.epoch, gap.value.expected) == (2, 1)
        await manager.commit_epoch(DISK, 1, order.token, one)
        await manager.commit_epoch(DISK, 1, order.token, one)  # the sender retried: no-op
        with pytest.raises(EpochRejected):
            await manager.commit_epoch(DISK, 1, order.token, two)
        with pytest.raises(EpochOutOfOrder):
            await manager.stage_export(DISK, 1, order.token)
        await manager.commit_epoch(DISK, 2, order.token, two)
        expected = apply_to(apply_to(snapshot, first), second)
        assert await read_export(manager, current_export(DISK)) == expected
        assert manager.committed_epoch(DISK) == 2
        state = manager.journal_state(DISK)
        assert (state.applied_epoch, state.digest(1), state.digest(2)) == (
            2,
            one.digest,
            two.digest,
        )


@pytest.mark.parametrize("size", [SIZE, SIZE + 12345])  # the last chunk clipped too
async def test_twenty_epochs_in_a_row_match_a_reference_model(tmp_path: Path, size: int) -> None:
    snapshot_id, snapshot = await make_lab_disk(tmp_path / "lab-disk", size, seed=size)
    order = OnpremDiskOrder("mig-20", DISK, 1, tmp_path / "lab-disk", snapshot_id)
    rng = random.Random(20)
    model = snapshot
    touched: set[int] = set()
    async with OnpremIoManager(tmp_path / "onprem") as manager:
        await manager.open_disk(order)
        for number in range(1, 21):
            epoch = random_epoch(rng, size)
            touched |= set(epoch)
            manifest, _ = await ship(manager, DISK, number, order.token, size, epoch)
            await manager.commit_epoch(DISK, number, order.token, manifest)
            model = apply_to(model, epoch)
            assert await read_export(manager, current_export(DISK)) == model, number
        assert (size - 1) // CHUNK in touched  # the last (maybe clipped) chunk was shipped
        # Each epoch was a layer of its own; the background compactions folded them down to
        # the snapshot's layer, the epochs before the last, and the last (the top).
        await manager.compacted()
        assert len(json.loads((order.disk_dir / "manifest.json").read_text())["layers"]) == 3
        assert await read_export(manager, current_export(DISK)) == model
        assert await read_export(manager, snapshot_export(DISK)) == snapshot
        await manager.close_disk(DISK, order.token)
        assert manager.status().exports == ()
    async with await LayeredDisk.open(order.disk_dir) as disk:
        assert await disk.active().read(0, size) == model
        assert await disk.at(order.snapshot_id).read(0, size) == snapshot
    async with OnpremIoManager(tmp_path / "onprem") as manager:
        await manager.open_disk(order)
        assert manager.committed_epoch(DISK) == 20
        assert await read_export(manager, current_export(DISK)) == model


async def test_orders_are_idempotent_and_checked(
    tmp_path: Path, lab: tuple[OnpremDiskOrder, bytes]
) -> None:
    order, _ = lab
    async with OnpremIoManager(tmp_path / "onprem") as manager:
        await manager.open_disk(order)
        await manager.open_disk(order)
        for other in (replace(order, snapshot_id="another"), replace(order, migration_id="m2")):
            with pytest.raises(OrderConflict):
                await manager.open_disk(other)
        await manager.open_disk(replace(order, token=order.token + 1))  # a new owner: no-op
        assert manager.status().disks[0].token == order.token + 1
        order = replace(order, token=order.token + 1)
        first = await manager.stage_export(DISK, 1, order.token)
        assert await manager.stage_export(DISK, 1, order.token) == first
        with pytest.raises(UnsafeName):
            await manager.open_disk(replace(order, disk_id="../escape"))
        with pytest.raises(DiskNotOpen):
            await manager.stage_export("disk-9", 1, order.token)
        await manager.close_disk(DISK, order.token)
        await manager.close_disk(DISK, order.token)
        await manager.close_disk("never-opened", 1)
        assert manager.status().exports == ()
        with pytest.raises(NbdProtocolError):  # no such export any more
            await read_export(manager, current_export(DISK))


async def test_an_empty_epoch_commits_and_counts(
    tmp_path: Path, lab: tuple[OnpremDiskOrder, bytes]
) -> None:
    order, snapshot = lab
    async with OnpremIoManager(tmp_path / "onprem") as manager:
        await manager.open_disk(order)
        await manager.commit_epoch(DISK, 1, order.token, EpochManifest.build([]))
        assert manager.committed_epoch(DISK) == 1
        assert await read_export(manager, current_export(DISK)) == snapshot
        entry = ManifestEntry(0, CHUNK, chunk_hash(b"\x01" * CHUNK))
        with pytest.raises(EpochRejected):  # entries, but nothing staged
            await manager.commit_epoch(DISK, 2, order.token, EpochManifest.build([entry]))
