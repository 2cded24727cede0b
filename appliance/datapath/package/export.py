"""Export: the migrate-time snapshot of each disk, written out as an offline package.

    async with open_store("s3://bucket/mig-42", S3Access.from_settings(settings)) as store:
        result = await export_package("mig-42", [ExportDisk("disk-0", source)], store,
                                      progress=publish)
    result.manifest_sha256   # keep it with the migration: the import is checked against it

Each disk is cut into ``chunk_size`` chunks on a fixed grid. A chunk the
source maps as zero (a hole, written zeroes) is not read; a chunk read as
all zeroes is not stored either: both are recorded in the manifest's zero
ranges. Every other chunk becomes one object named by its disk, offset and
chunk hash. ``workers`` chunks are in hand at once, so memory stays near
``workers * chunk_size`` whatever the disk size.

Resumable: an object that is already in the package under its name (which
carries its hash; objects are written atomically, so one that exists is
whole) is not written again. An interrupted export (cancelled, killed) is
simply run again. The manifest is written last, once every chunk is
durable, so a package with a manifest is complete.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from appliance.clock import Clock, SystemClock
from appliance.datapath.chunks import ChunkTable, normalized
from appliance.datapath.copier import is_zero
from appliance.datapath.package.manifest import (
    MANIFEST_NAME,
    ChunkEntry,
    DiskEntry,
    Manifest,
    ZeroRange,
    check_disk_id,
    digest_of,
    encode,
    manifest_sha256,
    object_name,
)
from appliance.datapath.package.store import PackageStore
from appliance.datapath.progress import ProgressCallback, ProgressMeter, TransferPhase
from appliance.datapath.retry import RetryPolicy, with_retries
from appliance.datapath.workers import first_failure, run_bounded
from appliance.logs import get_logger
from appliance.storage.backend import Backend
from appliance.storage.extents import Extent, allocated_length, iter_chunks
from appliance.storage.hashing import chunk_hash, zero_hash

DEFAULT_CHUNK_SIZE = 1 << 20
"""The transfer engine's. A whole chunk is stored when any of it holds data, so larger chunks
ship more: a 1 GiB lab disk (505 MiB allocated) made a 436 MiB package at 1 MiB, 632 MiB at
4 MiB, at about the same speed."""
log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class ExportDisk:
    """One disk to export: its id (a safe name) and its source, read-only (a snapshot)."""

    disk_id: str
    source: Backend


@dataclass(frozen=True, slots=True)
class ExportOptions:
    chunk_size: int = DEFAULT_CHUNK_SIZE
    workers: int = 4
    """Chunks in hand at once (read, hashed, being stored): memory is about workers x chunk."""
    verify_present: bool = True
    """Fetch and hash an object an earlier run left, rewriting it unless it is correct
    (False: trust its name, which carries its hash, and its size)."""
    progress_interval_s: float = 1.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        if self.chunk_size <= 0 or self.chunk_size % 4096 or self.workers < 1:
            raise ValueError("chunk_size must be a positive multiple of 4096, workers >= 1")


@dataclass(slots=True)
class ExportCounters:
    chunks_stored: int = 0
    """Objects this run wrote."""
    chunks_present: int = 0
    """Objects an interrupted run had written already, and correct: not written again."""
    chunks_repaired: int = 0
    """Objects an earlier run left that were not what their name says: written again."""
    chunks_zero: int = 0
    """Chunks recorded as zero (nothing stored)."""
    bytes_read: int = 0
    bytes_stored: int = 0


@dataclass(frozen=True, slots=True)
class ExportResult:
    location: str
    manifest_sha256: str
    manifest: Manifest
    counters: ExportCounters


class _DiskExport:
    """The chunks of one disk, read, hashed and stored by a fixed pool of workers."""

    def __init__(
        self,
        disk: ExportDisk,
        extents: list[Extent],
        store: PackageStore,
        present: dict[str, int],
        options: ExportOptions,
        meter: ProgressMeter,
        counters: ExportCounters,
        clock: Clock,
    ) -> None:
        self._disk = disk
        self._extents = extents
        self._store = store
        self._present = present
        self._options = options
        self._meter = meter
        self._counters = counters
        self._clock = clock
        self._table = ChunkTable(disk.source.size, options.chunk_size)
        self._entries: dict[int, ChunkEntry] = {}

    async def run(self) -> DiskEntry:
        chunks = iter_chunks(self._extents, self._options.chunk_size)
        await run_bounded(chunks, self._chunk, workers=self._options.workers)
        if not self._table.complete():
            raise ValueError(f"{self._disk.source.name}: its extent map left chunks out")
        return DiskEntry(
            disk_id=self._disk.disk_id,
            size=self._table.size,
            chunk_size=self._table.chunk_size,
            image_digest=digest_of(self._table),
            chunks=tuple(self._entries[index] for index in sorted(self._entries)),
            zero=self._zero_ranges(),
        )

    def _zero_ranges(self) -> tuple[ZeroRange, ...]:
        ranges: list[ZeroRange] = []
        for index in range(self._table.count):
            if index in self._entries:
                continue
            start, length = self._table.bounds(index)
            if ranges and ranges[-1].offset + ranges[-1].length == start:
                last = ranges.pop()
                ranges.append(ZeroRange(offset=last.offset, length=last.length + length))
            else:
                ranges.append(ZeroRange(offset=start, length=length))
        return tuple(ranges)

    def _zero(self, index: int, length: int, allocated: int) -> None:
        self._table.set(index, zero_hash(length))
        self._counters.chunks_zero += 1
        self._meter.add(allocated, 1, worked=False)

    async def _already_stored(self, name: str, digest: bytes, length: int) -> bool:
        if name not in self._present:
            return False
        if self._present[name] == length and not self._options.verify_present:
            return True
        stored = await self._store.get(name) if self._present[name] == length else None
        if stored is not None and chunk_hash(stored) == digest:
            return True
        self._counters.chunks_repaired += 1
        return False

    async def _chunk(self, item: tuple[int, list[Extent]]) -> None:
        index, segments = item
        start, length = self._table.bounds(index)
        allocated = allocated_length(segments)
        mapped_zero = sum(segment.length for segment in segments if segment.zero)
        if mapped_zero == length:
            self._zero(index, length, allocated)
            return
        source = self._disk.source
        data = await with_retries(
            self._options.retry, self._clock, start, length, lambda: source.read(start, length)
        )
        self._counters.bytes_read += len(data)
        digest = chunk_hash(data)
        if digest == zero_hash(length) and is_zero(data):
            self._zero(index, length, allocated)
            return
        name = object_name(self._disk.disk_id, start, digest.hex())
        if await self._already_stored(name, digest, length):
            self._counters.chunks_present += 1
        else:
            await self._store.put(name, data)
            self._counters.chunks_stored += 1
            self._counters.bytes_stored += length
        self._entries[index] = ChunkEntry(
            offset=start, length=length, hash=digest.hex(), object=name
        )
        self._table.set(index, digest)
        self._meter.add(allocated, 1, worked=True)


async def export_package(
    migration_id: str,
    disks: Sequence[ExportDisk],
    store: PackageStore,
    *,
    options: ExportOptions | None = None,
    progress: ProgressCallback | None = None,
    clock: Clock | None = None,
) -> ExportResult:
    """Write every disk's chunks, then the manifest; the manifest's SHA-256 comes back.

    Cancel the task to interrupt it; calling it again with the same disks and
    store resumes (objects already stored are not written again).
    """
    options = options or ExportOptions()
    clock = clock or SystemClock()
    for disk in disks:
        check_disk_id(disk.disk_id)
    maps = [
        normalized(
            await with_retries(options.retry, clock, 0, d.source.size, d.source.extents),
            d.source.size,
        )
        for d in disks
    ]
    present = await store.list()
    meter = ProgressMeter(
        f"package:{migration_id}",
        clock,
        bytes_total=sum(allocated_length(extents) for extents in maps),
        chunks_total=sum(-(-d.source.size // options.chunk_size) for d in disks),
    )
    counters = ExportCounters()
    bound = log.bind(migration_id=migration_id, location=store.location)
    bound.info("package export starting", disks=len(disks), objects_present=len(present))
    try:
        entries = await _export_disks(
            disks, maps, store, present, options, meter, counters, clock, progress
        )
    except BaseExceptionGroup as group:
        raise first_failure(group) from None
    await store.sync()  # every chunk durable before the manifest that lists them
    manifest = Manifest(migration_id=migration_id, disks=tuple(entries))
    data = encode(manifest)
    await store.put(MANIFEST_NAME, data)
    await store.sync()
    meter.phase = TransferPhase.DONE
    if progress is not None:
        progress(meter.snapshot())
    digest = manifest_sha256(data)
    bound.info("package exported", manifest_sha256=digest, **asdict(counters))
    return ExportResult(store.location, digest, manifest, counters)


async def _export_disks(
    disks: Sequence[ExportDisk],
    maps: list[list[Extent]],
    store: PackageStore,
    present: dict[str, int],
    options: ExportOptions,
    meter: ProgressMeter,
    counters: ExportCounters,
    clock: Clock,
    progress: ProgressCallback | None,
) -> list[DiskEntry]:
    """Disk after disk (each has its own pool of workers), with a progress reporter alongside."""
    entries: list[DiskEntry] = []
    async with asyncio.TaskGroup() as group:
        reporter = None
        if progress is not None:
            reporter = group.create_task(meter.report_every(options.progress_interval_s, progress))
        try:
            for disk, extents in zip(disks, maps, strict=True):
                export = _DiskExport(disk, extents, store, present, options, meter, counters, clock)
                entries.append(await export.run())
        finally:
            if reporter is not None:
                reporter.cancel()
    return entries
