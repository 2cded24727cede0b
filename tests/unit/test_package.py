"""Offline packages in a directory, from and to in-memory disks: format, defects, resume."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from appliance.cli import main
from appliance.datapath.checkpoint import MemoryCheckpointStore
from appliance.datapath.package import (
    MANIFEST_NAME,
    ExportDisk,
    ExportOptions,
    ImportOptions,
    PackageStore,
    export_package,
    import_package,
    open_store,
    verify_package,
)
from appliance.datapath.package.manifest import decode, encode, object_name
from appliance.datapath.progress import TransferProgress
from appliance.errors import (
    PackageChunkCorrupt,
    PackageChunkMissing,
    PackageDefects,
    PackageLocationInvalid,
    PackageManifestMismatch,
    PackageNeedsCorrection,
)
from appliance.storage.hashing import chunk_hash
from appliance.storage.memory import MemoryBackend

CHUNK = 64 * 1024
OPTIONS = ExportOptions(chunk_size=CHUNK, workers=3)


def pattern(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


async def disk_a() -> MemoryBackend:
    """11 chunks, the last one short: data, holes, a partly written chunk, written zeroes,
    data that happens to be all zeroes."""
    disk = MemoryBackend(10 * CHUNK + 5000, name="disk-a")
    await disk.write(0, pattern(1, CHUNK))
    await disk.write(2 * CHUNK, pattern(2, 4096))  # chunk 2: 4 KiB of data, the rest a hole
    await disk.zero(5 * CHUNK, CHUNK)  # chunk 5: allocated, mapped zero
    await disk.write(6 * CHUNK, bytes(CHUNK))  # chunk 6: data the map calls data, all zero
    await disk.write(7 * CHUNK, pattern(7, 2 * CHUNK))
    await disk.write(10 * CHUNK, pattern(10, 5000))
    return disk


async def disk_b() -> MemoryBackend:
    disk = MemoryBackend(3 * CHUNK, name="disk-b")
    await disk.write(CHUNK + 100, pattern(11, 300))
    return disk


DATA_CHUNKS = {"disk-a": [0, 2, 7, 8, 10], "disk-b": [1]}


async def sources() -> list[ExportDisk]:
    return [ExportDisk("disk-a", await disk_a()), ExportDisk("disk-b", await disk_b())]


async def contents(disk: MemoryBackend) -> bytes:
    return await disk.read(0, disk.size)


def targets_for(disks: list[ExportDisk]) -> dict[str, MemoryBackend]:
    return {d.disk_id: MemoryBackend(d.source.size, name=f"{d.disk_id}_ARM") for d in disks}


async def export_to(location: Path, disks: list[ExportDisk]) -> str:
    async with open_store(str(location)) as store:
        result = await export_package("mig-1", disks, store, options=OPTIONS)
    return result.manifest_sha256


def chunk_path(location: Path, disk: ExportDisk, index: int) -> Path:
    manifest = decode((location / MANIFEST_NAME).read_bytes())
    entry = next(c for c in manifest.disk(disk.disk_id).chunks if c.offset == index * CHUNK)
    return location / entry.object


async def test_round_trip_through_a_directory_stores_only_data_chunks(tmp_path: Path) -> None:
    disks = await sources()
    location = tmp_path / "package"
    seen: list[TransferProgress] = []
    async with open_store(str(location)) as store:
        result = await export_package("mig-1", disks, store, options=OPTIONS, progress=seen.append)
    manifest = decode((location / MANIFEST_NAME).read_bytes())
    assert result.manifest == manifest
    for disk in disks:
        entry = manifest.disk(disk.disk_id)
        assert [c.offset // CHUNK for c in entry.chunks] == DATA_CHUNKS[disk.disk_id]
        for chunk in entry.chunks:
            stored = (location / chunk.object).read_bytes()
            assert stored == await disk.source.read(chunk.offset, chunk.length)
            assert chunk_hash(stored).hex() == chunk.hash
    # Holes, written zeroes and all-zero data are zero ranges: nothing stored for them.
    objects = sorted(p.relative_to(location).as_posix() for p in location.rglob("*.chunk"))
    assert len(objects) == 6
    stored_bytes = sum((location / name).stat().st_size for name in objects)
    assert stored_bytes == 5 * CHUNK + 5000  # a: 0, 2 (whole chunk), 7, 8, 10 (short); b: 1
    assert [(z.offset // CHUNK, z.length // CHUNK) for z in manifest.disk("disk-a").zero] == [
        (1, 1),
        (3, 4),
        (9, 1),
    ]
    assert result.counters.chunks_stored == 6 and result.counters.chunks_zero == 8
    assert seen[-1].bytes_done == seen[-1].bytes_total and seen[-1].eta_s == 0.0

    targets = targets_for(disks)
    reported: list[TransferProgress] = []
    async with open_store(str(location)) as store:
        imported = await import_package(
            store, result.manifest_sha256, targets, progress=reported.append
        )
    assert reported[-1].bytes_done == reported[-1].bytes_total == 5 * CHUNK + 5000
    for disk in disks:
        assert await contents(targets[disk.disk_id]) == await disk.source.read(0, disk.source.size)
    assert imported.counters.chunks_written == 6
    assert dict(imported.image_digests) == {d.disk_id: d.image_digest for d in manifest.disks}


async def test_missing_and_corrupt_chunks_are_all_named_and_a_corrected_import_passes(
    tmp_path: Path,
) -> None:
    disks = await sources()
    location = tmp_path / "package"
    sha = await export_to(location, disks)
    missing = chunk_path(location, disks[0], 7)
    corrupt = chunk_path(location, disks[1], 1)
    kept_missing, kept_corrupt = missing.read_bytes(), corrupt.read_bytes()
    missing.unlink()
    flipped = bytearray(kept_corrupt)
    flipped[CHUNK // 2] ^= 0x01
    corrupt.write_bytes(flipped)

    targets = targets_for(disks)
    writes: list[int] = []
    for target in targets.values():
        track_writes(target, writes)
    stores: dict[str, MemoryCheckpointStore] = {}

    def checkpoints(disk_id: str) -> MemoryCheckpointStore:
        return stores.setdefault(disk_id, MemoryCheckpointStore())

    async with open_store(str(location)) as store:
        with pytest.raises(PackageDefects) as caught:
            await import_package(store, sha, targets, checkpoints=checkpoints)
    defects = caught.value.defects
    assert isinstance(caught.value, PackageNeedsCorrection)
    assert [(type(d), d.disk_id, d.offset, d.object_name) for d in defects] == [
        (PackageChunkMissing, "disk-a", 7 * CHUNK, missing.relative_to(location).as_posix()),
        (PackageChunkCorrupt, "disk-b", CHUNK, corrupt.relative_to(location).as_posix()),
    ]
    assert f"offset {7 * CHUNK}" in str(caught.value) and corrupt.name in str(caught.value)
    bad = defects[1]
    assert isinstance(bad, PackageChunkCorrupt)
    assert bad.found == chunk_hash(bytes(flipped)).hex() and bad.expected != bad.found
    # Nothing unverified was written: the bad chunks' ranges are still zero at the target.
    assert await targets["disk-a"].read(7 * CHUNK, CHUNK) == bytes(CHUNK)
    assert await targets["disk-b"].read(CHUNK, CHUNK) == bytes(CHUNK)
    assert sorted(writes) == sorted([0, 2 * CHUNK, 8 * CHUNK, 10 * CHUNK])

    # The person puts the right objects back; the next import writes only those two.
    missing.write_bytes(kept_missing)
    corrupt.write_bytes(kept_corrupt)
    writes.clear()
    async with open_store(str(location)) as store:
        result = await import_package(store, sha, targets, checkpoints=checkpoints)
    assert sorted(writes) == [CHUNK, 7 * CHUNK]
    assert result.counters.chunks_written == 2
    for disk in disks:
        assert await contents(targets[disk.disk_id]) == await disk.source.read(0, disk.source.size)


def track_writes(target: MemoryBackend, writes: list[int]) -> None:
    original = target.write

    async def write(offset: int, data: bytes | memoryview) -> None:
        writes.append(offset)
        await original(offset, data)

    target.write = write  # type: ignore[method-assign]


async def test_a_tampered_or_missing_manifest_is_refused(tmp_path: Path) -> None:
    disks = await sources()
    location = tmp_path / "package"
    sha = await export_to(location, disks)
    document = json.loads((location / MANIFEST_NAME).read_bytes())
    chunk = document["disks"][0]["chunks"][0]
    # Point the manifest at a chunk of the attacker's making: consistent, but not ours.
    forged = pattern(99, chunk["length"])
    chunk["hash"] = chunk_hash(forged).hex()
    chunk["object"] = object_name("disk-a", chunk["offset"], chunk["hash"])
    (location / chunk["object"]).write_bytes(forged)
    (location / MANIFEST_NAME).write_bytes(json.dumps(document).encode())
    targets = targets_for(disks)
    async with open_store(str(location)) as store:
        with pytest.raises(PackageManifestMismatch) as caught:
            await import_package(store, sha, targets)
        assert caught.value.expected == sha and caught.value.found not in (None, sha)
        assert isinstance(caught.value, PackageNeedsCorrection)
        (location / MANIFEST_NAME).unlink()
        with pytest.raises(PackageManifestMismatch) as gone:
            await import_package(store, sha, targets)
        assert gone.value.found is None
    for target in targets.values():  # nothing was written from a refused package
        assert await contents(target) == bytes(target.size)


class GatedStore:
    """A package store whose puts stop for good after ``allow`` of them (the test's gate)."""

    def __init__(self, inner: PackageStore, allow: int) -> None:
        self.inner = inner
        self.allow = allow
        self.started = 0
        self.finished = 0
        self.blocked = asyncio.Event()
        self.allowed_done = asyncio.Event()

    @property
    def location(self) -> str:
        return self.inner.location

    async def list(self) -> dict[str, int]:
        return await self.inner.list()

    async def get(self, name: str) -> bytes | None:
        return await self.inner.get(name)

    async def sync(self) -> None:
        await self.inner.sync()

    async def put(self, name: str, data: bytes | memoryview) -> None:
        if self.started >= self.allow:
            self.blocked.set()
            await asyncio.Event().wait()  # held until the test cancels the export
        self.started += 1
        await self.inner.put(name, data)
        self.finished += 1
        if self.finished == self.allow:
            self.allowed_done.set()


async def test_an_interrupted_export_resumes_without_rewriting_what_it_stored(
    tmp_path: Path,
) -> None:
    disks = await sources()
    location = tmp_path / "package"
    async with open_store(str(location)) as store:
        gated = GatedStore(store, allow=3)
        task = asyncio.create_task(export_package("mig-1", disks, gated, options=OPTIONS))
        await gated.blocked.wait()
        await gated.allowed_done.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert not (location / MANIFEST_NAME).exists()
    first = {p: p.stat().st_mtime_ns for p in location.rglob("*.chunk")}
    assert len(first) == 3
    async with open_store(str(location)) as store:
        result = await export_package("mig-1", disks, store, options=OPTIONS)
    assert (result.counters.chunks_present, result.counters.chunks_stored) == (3, 3)
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in first.items())
    # The same package as one uninterrupted export: same manifest, same hash.
    fresh = await export_to(tmp_path / "fresh", await sources())
    assert result.manifest_sha256 == fresh


async def test_a_resumed_export_rewrites_an_object_that_is_not_what_its_name_says(
    tmp_path: Path,
) -> None:
    disks = await sources()
    location = tmp_path / "package"
    await export_to(location, disks)
    damaged = chunk_path(location, disks[0], 8)
    damaged.write_bytes(bytes(damaged.stat().st_size))
    async with open_store(str(location)) as store:
        result = await export_package("mig-1", disks, store, options=OPTIONS)
        report = await verify_package(store, result.manifest_sha256)
    assert (result.counters.chunks_repaired, result.counters.chunks_stored) == (1, 1)
    assert report.ok and report.chunks_checked == 6


class GatedTarget(MemoryBackend):
    """A target whose writes stop for good after ``allow`` of them."""

    def __init__(self, size: int, allow: int) -> None:
        super().__init__(size, name="gated")
        self.allow = allow
        self.started = 0
        self.finished = 0
        self.blocked = asyncio.Event()
        self.allowed_done = asyncio.Event()

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        if self.started >= self.allow:
            self.blocked.set()
            await asyncio.Event().wait()
        self.started += 1
        await super().write(offset, data)
        self.finished += 1
        if self.finished == self.allow:
            self.allowed_done.set()


async def test_an_interrupted_import_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    disk = ExportDisk("disk-a", await disk_a())
    location = tmp_path / "package"
    sha = await export_to(location, [disk])
    target = GatedTarget(disk.source.size, allow=2)
    checkpoint = MemoryCheckpointStore()
    options = ImportOptions(workers=2)
    async with open_store(str(location)) as store:
        task = asyncio.create_task(
            import_package(
                store, sha, {"disk-a": target}, checkpoints=lambda _: checkpoint, options=options
            )
        )
        await target.blocked.wait()
        await target.allowed_done.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert checkpoint.durable_round >= 1  # the cancelled run flushed and kept its records
        target.allow = 10**6
        result = await import_package(
            store, sha, {"disk-a": target}, checkpoints=lambda _: checkpoint, options=options
        )
        # 2 data chunks and the 6 zero chunks were durable: only the 3 data chunks left are written
        assert (result.counters.chunks_skipped, result.counters.chunks_written) == (8, 3)
        assert await contents(target) == await disk.source.read(0, disk.source.size)
        # Once complete, another call checks nothing again and writes nothing.
        again = await import_package(
            store, sha, {"disk-a": target}, checkpoints=lambda _: checkpoint, options=options
        )
    assert again.counters.chunks_written == 0 and again.counters.chunks_skipped == 11


class UnflushedCheckpoint(MemoryCheckpointStore):
    """A checkpoint whose durable marks never land: as if the process died before each one."""

    async def mark_durable(self, flush_round: int) -> None:
        return None


async def test_chunks_recorded_but_not_known_flushed_are_checked_at_the_target(
    tmp_path: Path,
) -> None:
    disk = ExportDisk("disk-a", await disk_a())
    location = tmp_path / "package"
    sha = await export_to(location, [disk])
    target = GatedTarget(disk.source.size, allow=2)
    checkpoint = UnflushedCheckpoint()
    options = ImportOptions(workers=1)
    async with open_store(str(location)) as store:
        task = asyncio.create_task(
            import_package(
                store, sha, {"disk-a": target}, checkpoints=lambda _: checkpoint, options=options
            )
        )
        await target.blocked.wait()
        await target.allowed_done.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        pending = sorted(r.index for r in checkpoint.records.values() if r.digest is not None)
        assert pending == [0, 2]
        await target.zero(2 * CHUNK, CHUNK)  # chunk 2's write never reached the disk
        target.allow = 10**6
        result = await import_package(
            store, sha, {"disk-a": target}, checkpoints=lambda _: checkpoint, options=options
        )
    counters = result.counters
    assert (counters.chunks_skipped, counters.chunks_reverified, counters.chunks_written) == (
        0,
        1,
        4,
    )
    assert await contents(target) == await disk.source.read(0, disk.source.size)


async def test_an_import_over_a_used_volume_zeroes_what_the_package_says_is_zero(
    tmp_path: Path,
) -> None:
    disk = ExportDisk("disk-a", await disk_a())
    location = tmp_path / "package"
    sha = await export_to(location, [disk])
    target = MemoryBackend.from_bytes(pattern(5, disk.source.size))
    async with open_store(str(location)) as store:
        await import_package(store, sha, {"disk-a": target})
    assert await contents(target) == await disk.source.read(0, disk.source.size)


async def test_verify_reports_every_defect_and_unknown_objects(tmp_path: Path) -> None:
    disks = await sources()
    location = tmp_path / "package"
    sha = await export_to(location, disks)
    chunk_path(location, disks[0], 0).unlink()
    chunk_path(location, disks[0], 10).write_bytes(b"short")
    (location / "disk-b" / "stray.chunk").write_bytes(b"x")
    async with open_store(str(location)) as store:
        report = await verify_package(store)
    assert report.manifest_sha256 == sha and not report.ok
    assert [(type(d).__name__, d.offset) for d in report.defects] == [
        ("PackageChunkMissing", 0),
        ("PackageChunkCorrupt", 10 * CHUNK),
    ]
    assert report.unknown_objects == ("disk-b/stray.chunk",)
    with pytest.raises(PackageDefects):
        report.raise_for_defects()


def test_the_manifest_refuses_names_and_layouts_it_did_not_make() -> None:
    good = {
        "format": "ferry-package",
        "version": 1,
        "migration_id": "m",
        "hash": "xxh3-128",
        "disks": [
            {
                "disk_id": "d",
                "size": 2 * CHUNK,
                "chunk_size": CHUNK,
                "image_digest": "0" * 32,
                "chunks": [
                    {
                        "offset": 0,
                        "length": CHUNK,
                        "hash": "a" * 32,
                        "object": object_name("d", 0, "a" * 32),
                    }
                ],
                "zero": [{"offset": CHUNK, "length": CHUNK}],
            }
        ],
    }
    manifest = decode(json.dumps(good).encode())
    assert decode(encode(manifest)) == manifest
    bad_name = json.loads(json.dumps(good))
    bad_name["disks"][0]["chunks"][0]["object"] = "../../etc/passwd"
    gap = json.loads(json.dumps(good))
    gap["disks"][0]["zero"] = []
    bad_disk = json.loads(json.dumps(good))
    bad_disk["disks"][0]["disk_id"] = ".."
    unknown = json.loads(json.dumps(good))
    unknown["extra"] = 1
    for document in (bad_name, gap, bad_disk, unknown):
        with pytest.raises(ValueError, match="invalid manifest"):
            decode(json.dumps(document).encode())


@pytest.mark.parametrize("location", ["http://host/x", "", "s3://", "s3://bucket/../x"])
async def test_locations_other_than_a_path_or_an_s3_prefix_are_refused(location: str) -> None:
    with pytest.raises(PackageLocationInvalid):
        async with open_store(location):
            pass


async def test_a_disk_id_that_would_leave_the_package_is_refused(tmp_path: Path) -> None:
    async with open_store(str(tmp_path / "p")) as store:
        with pytest.raises(ValueError, match="cannot name"):
            await export_package("m", [ExportDisk("../x", MemoryBackend(CHUNK))], store)


@pytest.fixture
def unconfigured_logging() -> Iterator[None]:
    """cli.main configures structlog onto this test's captured output: undo it after."""
    yield
    structlog.reset_defaults()


@pytest.mark.usefixtures("unconfigured_logging")
def test_the_verify_command_names_defects_and_refuses_another_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:

    location = tmp_path / "package"

    async def build() -> tuple[str, ExportDisk]:
        disks = await sources()
        return await export_to(location, disks), disks[0]

    sha, disk = asyncio.run(build())
    assert main(["package", "verify", str(location), "--manifest-sha256", sha]) == 0
    assert "OK" in capsys.readouterr().out
    broken = chunk_path(location, disk, 8)
    broken.unlink()
    assert main(["package", "verify", str(location), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert [(d["kind"], d["offset"], d["object"]) for d in report["defects"]] == [
        ("missing", 8 * CHUNK, broken.relative_to(location).as_posix())
    ]
    assert main(["package", "verify", str(location), "--manifest-sha256", "0" * 64]) == 1
    assert "manifest refused" in capsys.readouterr().err


class CountingStore(GatedStore):
    """Puts wait until ``workers`` of them are in flight at once, then all go: the most ever
    in flight (and so the chunk buffers held) is measured, not assumed."""

    def __init__(self, inner: PackageStore, workers: int) -> None:
        super().__init__(inner, allow=10**6)
        self.workers = workers
        self.in_flight = 0
        self.most = 0
        self.full = asyncio.Event()

    async def put(self, name: str, data: bytes | memoryview) -> None:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        if self.in_flight == self.workers:
            self.full.set()
        if name != MANIFEST_NAME:
            await self.full.wait()
        try:
            await self.inner.put(name, data)
        finally:
            self.in_flight -= 1


async def test_an_export_holds_at_most_workers_chunks_at_once(tmp_path: Path) -> None:
    disk = MemoryBackend(40 * CHUNK, name="dense")
    await disk.write(0, pattern(3, 40 * CHUNK))
    async with open_store(str(tmp_path / "package")) as store:
        counting = CountingStore(store, workers=3)
        result = await export_package(
            "m", [ExportDisk("dense", disk)], counting, options=ExportOptions(CHUNK, workers=3)
        )
    assert counting.most == 3
    assert result.counters.chunks_stored == 40


async def test_a_location_that_cannot_hold_a_package_is_named(tmp_path: Path) -> None:
    occupied = tmp_path / "a-file"
    occupied.write_bytes(b"not a directory")
    disks = await sources()
    async with open_store(str(occupied)) as store:
        with pytest.raises(PackageLocationInvalid) as caught:
            await export_package("m", disks, store, options=OPTIONS)
        assert caught.value.location == str(occupied)
        with pytest.raises(PackageManifestMismatch) as nothing:  # an import waits for it
            await import_package(store, "0" * 64, targets_for(disks))
    assert nothing.value.found is None


class SlowFirstChunk(GatedStore):
    """The first chunk's object is only handed out after the last one's: workers finish out of
    order, as they do over a real link."""

    def __init__(self, inner: PackageStore, first: str, last: str) -> None:
        super().__init__(inner, allow=10**6)
        self.first, self.last = first, last
        self.last_served = asyncio.Event()

    async def get(self, name: str) -> bytes | None:
        if name == self.first:
            await self.last_served.wait()
        data = await self.inner.get(name)
        if name == self.last:
            self.last_served.set()
        return data


async def test_defects_are_listed_in_disk_order_whatever_order_workers_finish(
    tmp_path: Path,
) -> None:
    disk = ExportDisk("disk-a", await disk_a())
    location = tmp_path / "package"
    sha = await export_to(location, [disk])
    first, last = chunk_path(location, disk, 0), chunk_path(location, disk, 10)
    for path in (first, last):
        path.write_bytes(b"damaged")
    names = [path.relative_to(location).as_posix() for path in (first, last)]
    async with open_store(str(location)) as store:
        slow = SlowFirstChunk(store, *names)
        with pytest.raises(PackageDefects) as caught:
            await import_package(
                slow, sha, {"disk-a": MemoryBackend(disk.source.size)}, options=ImportOptions(3)
            )
    assert [d.offset for d in caught.value.defects] == [0, 10 * CHUNK]
