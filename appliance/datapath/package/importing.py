"""Import: a shipped package, checked chunk by chunk, written into the cloud volumes.

    async with open_store(location, s3) as store:
        result = await import_package(store, record.manifest_sha256,
                                      {"disk-0": volume}, checkpoints=journal_checkpoints)

1. The manifest must hash to the SHA-256 the export returned, else
   :class:`~appliance.errors.PackageManifestMismatch` (nothing else is read).
2. Every data chunk is fetched and hashed; one that is absent or whose hash
   differs is *not* written, and is recorded as a defect; the import goes on
   to the end, so one run names every bad chunk. Good chunks are written into
   the target and recorded in the disk's checkpoint (flush rounds: a record
   counts only once the target has flushed it). Zero ranges are zeroed (or
   skipped on a target that reads as zeroes already).
3. A disk without defects gets the whole-image check (the target's chunk
   hashes, from its own map and data, against the manifest's); a difference
   forgets those chunks in the checkpoint (the next run writes them again)
   and raises :class:`~appliance.errors.CertificationFailed`.
4. Defects raise :class:`~appliance.errors.PackageDefects` listing them all.
   It is a :class:`~appliance.errors.PackageNeedsCorrection`: the caller waits
   for a corrected import and calls again; the checkpoint makes that second
   run fetch and write only the chunks that were missing or bad.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field

from appliance.clock import Clock, SystemClock
from appliance.datapath.checkpoint import (
    CheckpointMeta,
    CheckpointStore,
    CheckpointWriter,
    MemoryCheckpointStore,
)
from appliance.datapath.chunks import ChunkTable
from appliance.datapath.imagecheck import RangeHasher, hash_image
from appliance.datapath.package.manifest import (
    MANIFEST_NAME,
    ChunkEntry,
    DiskEntry,
    Manifest,
    ZeroRange,
    decode,
    manifest_sha256,
)
from appliance.datapath.package.store import PackageStore
from appliance.datapath.progress import ProgressCallback, ProgressMeter, TransferPhase
from appliance.datapath.retry import RetryPolicy, with_retries
from appliance.datapath.workers import first_failure, run_bounded
from appliance.errors import (
    CertificationFailed,
    PackageChunkCorrupt,
    PackageChunkMissing,
    PackageDefects,
    PackageLocationInvalid,
    PackageManifestMismatch,
)
from appliance.logs import get_logger
from appliance.storage.backend import Backend
from appliance.storage.hashing import HASH_NAME, chunk_hash

MAX_ZERO_REQUEST = 64 << 20
FINAL_SYNC_TIMEOUT_S = 15.0
log = get_logger(__name__)
Defect = PackageChunkMissing | PackageChunkCorrupt


@dataclass(frozen=True, slots=True)
class ImportOptions:
    workers: int = 4
    """Chunks fetched and written at once: memory is about workers x chunk size."""
    target_is_zero: bool = False
    """The targets read as zeroes already (fresh volumes): zero ranges are not written."""
    flush_interval_s: float = 1.0
    progress_interval_s: float = 1.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        if self.workers < 1 or self.flush_interval_s <= 0:
            raise ValueError("workers and flush_interval_s must be positive")


@dataclass(slots=True)
class ImportCounters:
    chunks_written: int = 0
    chunks_skipped: int = 0
    """Durable at the target from an earlier run: neither fetched nor written."""
    chunks_reverified: int = 0
    """Written by an earlier run, flush unknown: the target's hash matched, not rewritten."""
    zero_chunks: int = 0
    bytes_fetched: int = 0
    bytes_written: int = 0


@dataclass(frozen=True, slots=True)
class ImportResult:
    location: str
    manifest_sha256: str
    image_digests: tuple[tuple[str, str], ...]
    """(disk id, whole-image digest in hex) of every target, as checked."""
    counters: ImportCounters


async def load_manifest(store: PackageStore, expected_sha256: str | None) -> tuple[Manifest, str]:
    """The package's manifest and its SHA-256, refused unless it hashes to ``expected_sha256``.

    ``None`` accepts any well-formed manifest (checking a package by hand).
    """
    expected = expected_sha256 or "(any)"
    try:
        data = await store.get(MANIFEST_NAME)
    except PackageLocationInvalid as error:  # no such bucket yet, no access: to be corrected
        raise PackageManifestMismatch(store.location, expected, None, error.reason) from error
    if data is None:
        raise PackageManifestMismatch(store.location, expected, None, f"no {MANIFEST_NAME}")
    found = manifest_sha256(data)
    if expected_sha256 is not None and found != expected_sha256:
        raise PackageManifestMismatch(store.location, expected, found, "it was changed")
    try:
        return decode(data), found
    except ValueError as error:
        raise PackageManifestMismatch(store.location, expected, found, str(error)) from None


def _zero_pieces(ranges: tuple[ZeroRange, ...]) -> Iterator[ZeroRange]:
    for zero in ranges:
        for at in range(zero.offset, zero.offset + zero.length, MAX_ZERO_REQUEST):
            length = min(MAX_ZERO_REQUEST, zero.offset + zero.length - at)
            yield ZeroRange(offset=at, length=length)


class _DiskImport:
    """One disk: its checkpoint, its workers, its defects, its whole-image check."""

    def __init__(
        self,
        disk: DiskEntry,
        target: Backend,
        store: PackageStore,
        present: dict[str, int],
        checkpoints: CheckpointStore,
        options: ImportOptions,
        meter: ProgressMeter,
        counters: ImportCounters,
        clock: Clock,
    ) -> None:
        self._disk = disk
        self._target = target
        self._store = store
        self._present = present
        self._checkpoints = checkpoints
        self._options = options
        self._meter = meter
        self._counters = counters
        self._clock = clock
        self._expected = disk.table()
        self._done: set[int] = set()
        self._pending: set[int] = set()
        self._hasher = RangeHasher(target)
        self.defects: list[Defect] = []

    async def run(self) -> str:
        """The whole-image digest in hex once the disk is complete; defects go in ``defects``."""
        first_round, complete = await self._load()
        if complete:
            self._counters.chunks_skipped += self._expected.count
            self._meter.add(self._disk.data_bytes, self._expected.count, worked=False)
            return self._disk.image_digest
        writer = CheckpointWriter(
            self._checkpoints, self._flush, first_round=first_round, clock=self._clock
        )
        try:
            await self._copy(writer)
        except BaseException:
            await self._last_sync(writer)
            raise
        await writer.sync()
        if self.defects:
            self.defects.sort(key=lambda defect: defect.offset)  # workers finish in any order
            return ""
        return await self._check()

    async def _copy(self, writer: CheckpointWriter) -> None:
        """Zero ranges, then every chunk not yet done; recorded as they land, not yet flushed."""
        async with asyncio.TaskGroup() as group:
            background = [
                group.create_task(writer.record_forever()),
                group.create_task(writer.sync_every(self._options.flush_interval_s)),
            ]
            try:
                await self._zero_ranges(writer)
                chunks = (c for c in self._disk.chunks if self._index(c) not in self._done)
                await run_bounded(chunks, self._handler(writer), workers=self._options.workers)
            finally:
                writer.stop()  # ends its loops even if a cancellation below gets lost
                for task in background:
                    task.cancel()

    async def _last_sync(self, writer: CheckpointWriter) -> None:
        """Best effort after a failure or cancellation: keep what was written and verified."""
        try:
            async with asyncio.timeout(FINAL_SYNC_TIMEOUT_S):
                await writer.sync()
        except Exception as error:
            log.warning("import checkpoint not synced", error=f"{type(error).__name__}: {error}")

    def _index(self, entry: ChunkEntry | ZeroRange) -> int:
        return entry.offset // self._disk.chunk_size

    async def _load(self) -> tuple[int, bool]:
        """Fill ``_done`` and ``_pending`` from the checkpoint; (first round, complete)."""
        meta = CheckpointMeta(self._disk.size, self._disk.chunk_size, HASH_NAME)
        checkpoint = await self._checkpoints.load()
        if checkpoint is None or checkpoint.meta != meta:
            await self._checkpoints.begin(meta)
            return 1, False
        if checkpoint.complete_digest == bytes.fromhex(self._disk.image_digest):
            return checkpoint.durable_round + 1, True
        zero = {index for r in self._disk.zero for index in self._indices(r)}
        for record in checkpoint.records:
            expected = None if record.index in zero else self._expected.digest(record.index)
            if record.index >= self._expected.count or record.digest != expected:
                continue  # another package's chunk: written again
            if record.round <= checkpoint.durable_round:
                self._done.add(record.index)
            else:
                self._pending.add(record.index)
        # Until re-verified, pending chunks must not be blessed by the next durable mark.
        await self._checkpoints.forget(sorted(self._pending))
        self._counters.chunks_skipped += len(self._done)
        skipped = sum(c.length for c in self._disk.chunks if self._index(c) in self._done)
        self._meter.add(skipped, len(self._done), worked=False)
        return checkpoint.durable_round + 1, False

    def _indices(self, zero: ZeroRange) -> range:
        size = self._disk.chunk_size
        return range(zero.offset // size, -(-(zero.offset + zero.length) // size))

    async def _flush(self) -> None:
        target = self._target
        await with_retries(self._options.retry, self._clock, 0, target.size, target.flush)

    async def _zero_ranges(self, writer: CheckpointWriter) -> None:
        for zero in _zero_pieces(self._disk.zero):
            indices = [i for i in self._indices(zero) if i not in self._done]
            if not indices:
                continue
            if not self._options.target_is_zero:
                await self._zero(zero)
            writer.add_many(indices, None)
            self._counters.zero_chunks += len(indices)
            self._meter.add(0, len(indices), worked=False)

    async def _zero(self, zero: ZeroRange) -> None:
        async def punch() -> None:
            await self._target.zero(zero.offset, zero.length, punch_hole=True)

        await with_retries(self._options.retry, self._clock, zero.offset, zero.length, punch)

    def _handler(self, writer: CheckpointWriter) -> Callable[[ChunkEntry], Awaitable[None]]:
        async def handle(chunk: ChunkEntry) -> None:
            index = self._index(chunk)
            if index in self._pending and await self._still_at_target(chunk):
                writer.add(index, bytes.fromhex(chunk.hash))
                self._counters.chunks_reverified += 1
                self._meter.add(chunk.length, 1, worked=False)
                return
            data = await self._fetch(chunk)
            if data is None:
                return
            await with_retries(
                self._options.retry,
                self._clock,
                chunk.offset,
                chunk.length,
                lambda: self._target.write(chunk.offset, data),
            )
            writer.add(index, bytes.fromhex(chunk.hash))
            self._counters.chunks_written += 1
            self._counters.bytes_written += chunk.length
            self._meter.add(chunk.length, 1, worked=True)

        return handle

    async def _still_at_target(self, chunk: ChunkEntry) -> bool:
        digest = await with_retries(
            self._options.retry,
            self._clock,
            chunk.offset,
            chunk.length,
            lambda: self._hasher.hash(chunk.offset, chunk.length),
        )
        return digest.hex() == chunk.hash

    async def _fetch(self, chunk: ChunkEntry) -> bytes | None:
        """The chunk's bytes, checked against the manifest; None (and a defect) otherwise."""
        disk_id = self._disk.disk_id
        data = await self._store.get(chunk.object) if chunk.object in self._present else None
        if data is None:
            self.defects.append(
                PackageChunkMissing(disk_id, chunk.offset, chunk.length, chunk.object)
            )
            return None
        self._counters.bytes_fetched += len(data)
        found = chunk_hash(data).hex()
        if found != chunk.hash or len(data) != chunk.length:
            self.defects.append(
                PackageChunkCorrupt(
                    disk_id, chunk.offset, chunk.length, chunk.object, chunk.hash, found
                )
            )
            return None
        return data

    async def _check(self) -> str:
        """The whole-image check of the target against the manifest; its digest in hex."""
        table = ChunkTable(self._disk.size, self._disk.chunk_size)
        await hash_image(
            self._target,
            self._hasher,
            table,
            needed=lambda index: True,
            workers=self._options.workers,
            policy=self._options.retry,
            clock=self._clock,
        )
        differ = [i for i in range(table.count) if table.digest(i) != self._expected.digest(i)]
        if differ:
            await self._checkpoints.forget(differ)
            start, length = table.bounds(differ[0])
            raise CertificationFailed(start, length)
        await self._checkpoints.mark_complete(bytes.fromhex(self._disk.image_digest))
        return self._disk.image_digest


async def import_package(
    store: PackageStore,
    expected_manifest_sha256: str,
    targets: Mapping[str, Backend],
    *,
    checkpoints: Callable[[str], CheckpointStore] | None = None,
    options: ImportOptions | None = None,
    progress: ProgressCallback | None = None,
    clock: Clock | None = None,
) -> ImportResult:
    """Verify every chunk of the package at ``store`` and write it into ``targets``.

    ``targets`` maps each disk id of the manifest to its volume (same size);
    ``checkpoints(disk_id)`` gives the disk's checkpoint store (Redis, fenced,
    in the appliance; in memory when omitted, so nothing resumes across calls).
    """
    options = options or ImportOptions()
    clock = clock or SystemClock()
    manifest, sha = await load_manifest(store, expected_manifest_sha256)
    _check_targets(manifest, targets)
    present = await store.list()
    meter = ProgressMeter(
        f"package:{manifest.migration_id}",
        clock,
        bytes_total=manifest.data_bytes,
        chunks_total=sum(-(-d.size // d.chunk_size) for d in manifest.disks),
    )
    counters = ImportCounters()
    stores = checkpoints or (lambda disk_id: MemoryCheckpointStore())
    bound = log.bind(migration_id=manifest.migration_id, location=store.location)
    bound.info("package import starting", disks=len(manifest.disks), objects=len(present))
    defects: list[Defect] = []
    digests: list[tuple[str, str]] = []
    try:
        async with asyncio.TaskGroup() as group:
            reporter = None
            if progress is not None:
                reporter = group.create_task(
                    meter.report_every(options.progress_interval_s, progress)
                )
            try:
                for disk in manifest.disks:
                    run = _DiskImport(
                        disk,
                        targets[disk.disk_id],
                        store,
                        present,
                        stores(disk.disk_id),
                        options,
                        meter,
                        counters,
                        clock,
                    )
                    digest = await run.run()
                    defects.extend(run.defects)
                    digests.append((disk.disk_id, digest))
            finally:
                if reporter is not None:
                    reporter.cancel()
    except BaseExceptionGroup as group_error:
        raise first_failure(group_error) from None
    if defects:
        bound.warning("package import needs correcting", defects=len(defects))
        raise PackageDefects(store.location, tuple(defects))
    meter.phase = TransferPhase.DONE
    if progress is not None:
        progress(meter.snapshot())
    bound.info("package imported", manifest_sha256=sha, **asdict(counters))
    return ImportResult(store.location, sha, tuple(digests), counters)


def _check_targets(manifest: Manifest, targets: Mapping[str, Backend]) -> None:
    wanted = {disk.disk_id: disk.size for disk in manifest.disks}
    if set(wanted) != set(targets):
        raise ValueError(f"the package holds disks {sorted(wanted)}, targets are {sorted(targets)}")
    for disk_id, size in wanted.items():
        if targets[disk_id].size != size:
            raise ValueError(
                f"disk {disk_id} is {size} bytes in the package, its target {targets[disk_id].size}"
            )
