"""Verifying an epoch from its landing hashes, and applying it by linking its staged file."""

from __future__ import annotations

import json
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
)
from appliance.components.onprem.staging import LANDING_BLOCK
from appliance.datapath.nbd import NbdBackend
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


@pytest.fixture
async def lab(tmp_path: Path) -> tuple[OnpremDiskOrder, bytes]:
    snapshot_id, content = await make_lab_disk(tmp_path / "lab-disk", SIZE)
    return OnpremDiskOrder("mig-a", DISK, 5, tmp_path / "lab-disk", snapshot_id), content


async def read_current(manager: OnpremIoManager) -> bytes:
    async with await NbdBackend.connect(manager.address, current_export(DISK)) as backend:
        return await backend.read(0, backend.size)


async def test_an_epoch_becomes_a_layer_of_the_disk_without_a_copy(
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
        (staged,) = order.disk_dir.glob("staged-*.raw")  # it landed in the disk's directory
        inode = staged.stat().st_ino
        monkeypatch.setattr(LayeredDisk, "active", counting_active)
        await manager.commit_epoch(DISK, 1, order.token, manifest)
        monkeypatch.undo()
        assert await read_current(manager) == apply_to(snapshot, epoch)
        assert not list(order.disk_dir.glob("staged-*"))
        assert not (tmp_path / "onprem" / "disks" / DISK / "stage-1").exists()
    assert writes == []  # not one byte written through the disk: no apply copy
    # The staged file is the disk's top layer now: the same inode.
    layers = json.loads((order.disk_dir / "manifest.json").read_text())["layers"]
    top = order.disk_dir / f"overlay-{layers[-1]:06d}.raw"
    assert top.stat().st_ino == inode
    async with await LayeredDisk.open(order.disk_dir) as disk:  # the disk alone holds it
        assert await disk.active().read(0, SIZE) == apply_to(snapshot, epoch)


async def test_staged_files_of_uncommitted_epochs_are_discarded_on_open(
    tmp_path: Path, lab: tuple[OnpremDiskOrder, bytes]
) -> None:
    order, snapshot = lab
    epoch = {3: random.Random(9).randbytes(CHUNK)}
    async with OnpremIoManager(tmp_path / "onprem") as manager:
        await manager.open_disk(order)
        await ship(manager, DISK, 1, order.token, SIZE, epoch)  # staged, never committed
    assert len(list(order.disk_dir.glob("staged-*.raw"))) == 1
    (order.disk_dir / ("staged-" + "ab" * 16 + ".raw")).write_bytes(b"left unnamed")
    async with OnpremIoManager(tmp_path / "onprem") as manager:
        await manager.open_disk(order)
        assert not list(order.disk_dir.glob("staged-*"))
        assert not list((tmp_path / "onprem" / "disks" / DISK).glob("stage-*"))
        assert manager.committed_epoch(DISK) == 0
        assert await read_current(manager) == snapshot
        manifest, _ = await ship(manager, DISK, 1, order.token, SIZE, epoch)
        await manager.commit_epoch(DISK, 1, order.token, manifest)
        assert await read_current(manager) == apply_to(snapshot, epoch)
