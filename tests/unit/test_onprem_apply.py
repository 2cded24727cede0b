"""Verifying an epoch from its landing hashes, and applying it in merged runs."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from appliance.components.onprem import (
    EpochManifest,
    ManifestEntry,
    OnpremDiskOrder,
    OnpremIoManager,
    StagingBackend,
    current_export,
    read_journal,
)
from appliance.components.onprem.commit import APPLY_PIECE, apply_runs
from appliance.components.onprem.staging import LANDING_BLOCK
from appliance.datapath.nbd import NbdBackend
from appliance.errors import EpochRejected
from appliance.storage.backend import Backend
from appliance.storage.hashing import chunk_hash, zero_hash
from appliance.storage.layered import LayeredDisk
from tests.support.onprem import CHUNK, MIB, apply_to, make_lab_disk, ship

KIB = 1024
SIZE = 8 * MIB
DISK = "disk-a"


def entry(offset: int, data: bytes) -> ManifestEntry:
    return ManifestEntry(offset, len(data), chunk_hash(data))


def zero_entry(offset: int, length: int) -> ManifestEntry:
    return ManifestEntry(offset, length, zero_hash(length))


async def test_entries_proven_by_their_landing_hashes_are_not_read_again(tmp_path: Path) -> None:
    rng = random.Random(1)
    run = rng.randbytes(4 * LANDING_BLOCK)  # one write of four blocks: four records
    alone = rng.randbytes(LANDING_BLOCK)
    split = rng.randbytes(LANDING_BLOCK)  # landed in two writes: no record covers it
    async with await StagingBackend.create(tmp_path, 1, SIZE) as staging:
        await staging.write(0, run)
        await staging.write(8 * LANDING_BLOCK, alone)
        await staging.write(10 * LANDING_BLOCK, split[:100])
        await staging.write(10 * LANDING_BLOCK + 100, split[100:])
        await staging.zero(12 * LANDING_BLOCK, 4 * LANDING_BLOCK)  # wider than an entry
        await staging.write(20 * LANDING_BLOCK, alone)
        await staging.write(20 * LANDING_BLOCK + 7, b"x")  # a later write inside it
        entries = [
            entry(i * LANDING_BLOCK, run[i * LANDING_BLOCK : (i + 1) * LANDING_BLOCK])
            for i in range(4)
        ]
        proven = [*entries, entry(8 * LANDING_BLOCK, alone)]
        split_entry = entry(10 * LANDING_BLOCK, split)
        zeroed = zero_entry(13 * LANDING_BLOCK, LANDING_BLOCK)
        overwritten = entry(20 * LANDING_BLOCK, alone)
        nothing = zero_entry(30 * LANDING_BLOCK, LANDING_BLOCK)
        manifest = EpochManifest.build([*proven, split_entry, zeroed, overwritten, nothing])
        assert staging.unproven(manifest) == [split_entry, zeroed, overwritten, nothing]
        # The records alone decide for the proven entries: the file is not read for them.
        # Damage the file under one of them behind the backend's back (damage at rest).
        with (tmp_path / "stage-1" / "data.raw").open("r+b") as raw:
            raw.seek(LANDING_BLOCK + 5)
            raw.write(b"\xff")
        # The unproven ones are read and hashed: only the overwritten one is wrong.
        assert await staging.mismatch(manifest) == overwritten
        fixed = EpochManifest.build(
            [*proven, split_entry, zeroed, entry(20 * LANDING_BLOCK, await read(staging))]
        )
        assert await staging.mismatch(fixed) is None
        # A record whose hash is not the entry's is no proof.
        other = EpochManifest.build([entry(8 * LANDING_BLOCK, split)])
        assert staging.unproven(other) == list(other.entries)
        assert await staging.mismatch(other) == other.entries[0]


async def read(staging: StagingBackend) -> bytes:
    return await staging.read(20 * LANDING_BLOCK, LANDING_BLOCK)


def test_adjacent_entries_merge_into_runs_of_at_most_a_piece() -> None:
    data = [entry(i * CHUNK, bytes([i + 1]) * CHUNK) for i in range(70)]  # 70 x 64 KiB
    zeroes = [zero_entry(100 * CHUNK + i * CHUNK, CHUNK) for i in range(3)]
    gap = entry(200 * CHUNK, b"g" * CHUNK)
    big = entry(300 * CHUNK, b"b" * (APPLY_PIECE + CHUNK))
    runs = apply_runs([*data, *zeroes, gap, big])
    per_piece = APPLY_PIECE // CHUNK
    assert [len(run) for run in runs] == [per_piece, 70 - per_piece, 3, 1, 1]
    assert runs[0] == tuple(data[:per_piece])
    assert runs[2] == tuple(zeroes)
    # Data next to zeroes does not join them.
    mixed = apply_runs([data[0], zero_entry(CHUNK, CHUNK), entry(2 * CHUNK, b"z" * CHUNK)])
    assert [len(run) for run in mixed] == [1, 1, 1]


@pytest.fixture
async def lab(tmp_path: Path) -> tuple[OnpremDiskOrder, bytes]:
    snapshot_id, content = await make_lab_disk(tmp_path / "lab-disk", SIZE)
    return OnpremDiskOrder("mig-a", DISK, 5, tmp_path / "lab-disk", snapshot_id), content


async def read_current(manager: OnpremIoManager) -> bytes:
    async with await NbdBackend.connect(manager.address, current_export(DISK)) as backend:
        return await backend.read(0, backend.size)


async def test_an_epoch_applies_in_merged_runs_and_matches_byte_for_byte(
    tmp_path: Path, lab: tuple[OnpremDiskOrder, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    order, snapshot = lab
    rng = random.Random(7)
    epoch = {index: rng.randbytes(CHUNK) for index in range(10, 90)}  # 5 MiB in a row
    epoch.update({95: bytes(CHUNK), 96: bytes(CHUNK), 120: rng.randbytes(CHUNK)})
    writes: list[tuple[int, int]] = []
    original = LayeredDisk.active

    def counting_active(disk: LayeredDisk) -> Backend:
        view = original(disk)
        write = view.write

        async def counted(offset: int, data: bytes | memoryview) -> None:
            writes.append((offset, len(data)))
            await write(offset, data)

        view.write = counted  # type: ignore[method-assign]
        return view

    async with OnpremIoManager(tmp_path / "onprem") as manager:
        await manager.open_disk(order)
        manifest, _ = await ship(manager, DISK, 1, order.token, SIZE, epoch)
        monkeypatch.setattr(LayeredDisk, "active", counting_active)
        await manager.commit_epoch(DISK, 1, order.token, manifest)
        monkeypatch.undo()
        assert await read_current(manager) == apply_to(snapshot, epoch)
    # 80 adjacent chunks: one 4 MiB run and one of the rest; the lone chunk alone.
    assert sorted(writes) == [
        (10 * CHUNK, APPLY_PIECE),
        (74 * CHUNK, 16 * CHUNK),
        (120 * CHUNK, CHUNK),
    ]


async def test_staged_bytes_damaged_at_rest_are_refused_before_they_reach_the_disk(
    tmp_path: Path, lab: tuple[OnpremDiskOrder, bytes]
) -> None:
    order, snapshot = lab
    rng = random.Random(8)
    epoch = {index: rng.randbytes(CHUNK) for index in range(4)}
    async with OnpremIoManager(tmp_path / "onprem") as manager:
        await manager.open_disk(order)
        manifest, _ = await ship(manager, DISK, 1, order.token, SIZE, epoch)
        raw = tmp_path / "onprem" / "disks" / DISK / "stage-1" / "data.raw"
        with raw.open("r+b") as staged:  # behind the backend's back: no landing record
            staged.seek(2 * CHUNK + 9)
            staged.write(b"\xee")
        with pytest.raises(EpochRejected) as refused:
            await manager.commit_epoch(DISK, 1, order.token, manifest)
        assert "changed after commit" in str(refused.value)
        # The run holding the damaged chunk was checked whole before any of it was written.
        assert await read_current(manager) == snapshot
        assert read_journal(manager.journal_path(DISK)).pending is not None


async def test_an_applied_staging_area_is_set_aside_then_removed(
    tmp_path: Path, lab: tuple[OnpremDiskOrder, bytes]
) -> None:
    order, snapshot = lab
    epoch = {3: random.Random(9).randbytes(CHUNK)}
    root = tmp_path / "onprem" / "disks" / DISK
    async with OnpremIoManager(tmp_path / "onprem") as manager:
        await manager.open_disk(order)
        manifest, _ = await ship(manager, DISK, 1, order.token, SIZE, epoch)
        await manager.commit_epoch(DISK, 1, order.token, manifest)
        assert not (root / "stage-1").exists()  # gone from where staging areas live
        assert await read_current(manager) == apply_to(snapshot, epoch)
    assert not list(root.glob("applied-stage-*"))  # removed by the time the manager closed
    # One left by a crash before its removal is removed at the next open.
    (root / "applied-stage-1").mkdir()
    (root / "applied-stage-1" / "data.raw").write_bytes(b"left over")
    async with OnpremIoManager(tmp_path / "onprem") as manager:
        await manager.open_disk(order)
        assert not list(root.glob("applied-stage-*"))
        assert manager.committed_epoch(DISK) == 1
