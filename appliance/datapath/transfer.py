"""The transfer engine: copy a disk, a snapshot or a set of extents, sparse, verified, resumable.

One :class:`Transfer` copies from a source Backend to a target Backend
(files, memory, NBD, a snapshot view)::

    transfer = Transfer("mig-42/disk-0", source, target, checkpoints=store,
                        options=TransferOptions(), progress=publish)
    result = await transfer.run()          # TransferResult: stats and image digests
    transfer.set_bandwidth(WAN_300_MBIT)   # while it runs, from any task
    transfer.set_source_queue_depth(8)
    transfer.stop()                        # or task.cancel(); both leave a usable checkpoint

The bandwidth cap, the source queue depth and the chunk buffers
(:class:`~appliance.datapath.buffers.BufferBudget`) may each be shared by
several transfers, to cap a whole WAN link, a whole source, a whole process.

How it works (modelled on ovirt-imageio's copy loop):

1. *Plan*. The extents to copy (the source's whole map by default, or the
   changed extents of an incremental sync) are cut into chunks
   (:mod:`~appliance.datapath.chunks`); chunks an earlier run made durable are
   skipped, chunks it left pending are verified at the target first.
2. *Copy*. A bounded queue feeds ``workers`` workers
   (:mod:`~appliance.datapath.workers`); each reads, hashes, writes and
   verifies a chunk (:mod:`~appliance.datapath.copier`). Source reads pass a
   queue-depth limiter, data writes a token bucket
   (:mod:`~appliance.datapath.throttle`). The first error cancels every
   worker; a stop request is honoured between chunks.
3. *Checkpoint*. Verified chunks are recorded at once and made durable after
   each target flush (:mod:`~appliance.datapath.checkpoint`: flush rounds).
4. *Check*. The whole-image digest (hash of per-chunk hashes) of source and
   target must match (:mod:`~appliance.datapath.imagecheck`); the target's
   side is always hashed afresh (its holes from its extent map, its data by
   the target), the source's from the hashes seen while copying, or afresh
   when ``certify`` asks for a full re-read of both sides. The last target
   flush runs alongside; the checkpoint is marked complete after both.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import structlog

from appliance.clock import Clock, SystemClock
from appliance.datapath.buffers import BufferBudget
from appliance.datapath.checkpoint import (
    CheckpointMeta,
    CheckpointStore,
    CheckpointWriter,
    MemoryCheckpointStore,
)
from appliance.datapath.chunks import (
    DEFAULT_CHUNK_SIZE,
    MAX_DATA_RUN,
    ChunkState,
    ChunkTable,
    measure,
    normalized,
    plan,
)
from appliance.datapath.copier import ChunkCopier, CopyContext, Counters
from appliance.datapath.imagecheck import RangeHasher, first_difference, hash_image, image_digest
from appliance.datapath.progress import ProgressCallback, ProgressMeter, TransferPhase
from appliance.datapath.retry import RetryPolicy, with_retries
from appliance.datapath.throttle import QueueDepthLimiter, TokenBucket
from appliance.datapath.workers import first_failure, run_bounded
from appliance.errors import CertificationFailed, TransferCancelled
from appliance.storage.backend import Backend
from appliance.storage.extents import Extent
from appliance.storage.hashing import HASH_NAME, zero_hash

log = structlog.get_logger(__name__)

DEFAULT_MAX_ZERO_RUN = 64 << 20


@dataclass(frozen=True, slots=True)
class TransferOptions:
    chunk_size: int = DEFAULT_CHUNK_SIZE
    workers: int = 8
    """Units of work in flight at once (each holds at most one chunk or data run)."""
    verify_chunks: bool = True
    whole_image_check: bool = True
    certify: bool = False
    """Re-read and hash both sides in full at the end, not only the target."""
    target_is_zero: bool = False
    """The target reads as zeroes already (a fresh sparse file): skip zero requests."""
    flush_interval_s: float = 1.0
    """Target flush and durable checkpoint mark this often; it also spreads the kernel's
    write-back over the copy instead of leaving all of it to the last flush."""
    progress_interval_s: float = 1.0
    max_zero_run: int = DEFAULT_MAX_ZERO_RUN
    max_data_run: int = MAX_DATA_RUN
    """Adjacent data chunks travel as one read and one write of up to this many bytes."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    final_sync_timeout_s: float = 15.0

    def __post_init__(self) -> None:
        if self.chunk_size <= 0 or self.workers < 1 or self.flush_interval_s <= 0:
            raise ValueError("chunk_size, workers and flush_interval_s must be positive")


@dataclass(frozen=True, slots=True)
class TransferStats:
    """Counters of one run. ``bytes_read_back`` is verification traffic from the target."""

    bytes_read: int
    bytes_written: int
    zero_bytes: int
    bytes_read_back: int
    chunks_copied: int
    chunks_zero: int
    chunks_skipped: int
    chunks_reverified: int
    chunks_resent: int
    retries: int
    mismatches: int
    chunks_verified_on_write: int
    """Chunks the target's digest of the write verified (no checksum or read-back)."""
    copy_s: float
    """Writing and verifying every chunk (periodic flushes included)."""
    sync_s: float
    """The last target flush and durable mark, alongside the check."""
    check_s: float
    """The whole-image check or certification; 0.0 when none ran."""


@dataclass(frozen=True, slots=True)
class TransferResult:
    transfer_id: str
    stats: TransferStats
    source_digest: bytes | None
    target_digest: bytes | None
    certified: bool
    resumed: bool


class Transfer:
    """One resumable copy from ``source`` to ``target``; ``run()`` it once."""

    def __init__(
        self,
        transfer_id: str,
        source: Backend,
        target: Backend,
        *,
        checkpoints: CheckpointStore | None = None,
        extents: Sequence[Extent] | None = None,
        options: TransferOptions | None = None,
        bandwidth: TokenBucket | None = None,
        source_io: QueueDepthLimiter | None = None,
        buffers: BufferBudget | None = None,
        progress: ProgressCallback | None = None,
        clock: Clock | None = None,
    ) -> None:
        if source.size != target.size:
            raise ValueError(f"source is {source.size} bytes, target {target.size}")
        self.transfer_id = transfer_id
        self._source = source
        self._target = target
        self._store: CheckpointStore = checkpoints or MemoryCheckpointStore()
        self._extents = extents
        self._options = options or TransferOptions()
        self._clock = clock or SystemClock()
        self._bandwidth = bandwidth or TokenBucket(clock=self._clock)
        self._source_io = source_io or QueueDepthLimiter()
        options = self._options
        self._buffers = buffers or BufferBudget(
            options.workers, max(options.chunk_size, options.max_data_run)
        )
        self._progress = progress
        self._stop = asyncio.Event()
        self._table = ChunkTable(source.size, self._options.chunk_size)
        self._counters = Counters()
        self._target_hasher = RangeHasher(target)
        self._source_hasher = RangeHasher(source)
        self._meter: ProgressMeter | None = None
        self._copy_s = 0.0
        self._sync_s = 0.0
        self._check_s = 0.0
        self._log = log.bind(transfer_id=transfer_id)

    # -- control while running ------------------------------------------------

    def set_bandwidth(self, bytes_per_s: float | None) -> None:
        """Cap bytes sent per second (None: unlimited); takes effect at once."""
        self._bandwidth.set_rate(bytes_per_s)

    def set_source_queue_depth(self, depth: int) -> None:
        """Cap concurrent source reads (never more than ``options.workers`` anyway)."""
        self._source_io.set_limit(depth)

    def stop(self) -> None:
        """Finish the chunks in hand, sync the checkpoint, raise TransferCancelled."""
        self._stop.set()

    @property
    def stats(self) -> TransferStats:
        read_back = self._target_hasher.bytes_read_back + self._source_hasher.bytes_read_back
        counters = asdict(self._counters) | {"bytes_read_back": read_back}
        return TransferStats(
            **counters, copy_s=self._copy_s, sync_s=self._sync_s, check_s=self._check_s
        )

    # -- the run ------------------------------------------------------------

    async def run(self) -> TransferResult:
        try:
            return await self._run()
        except BaseExceptionGroup as group:
            raise first_failure(group) from None

    async def _run(self) -> TransferResult:
        policy = self._options.retry
        size = self._source.size
        extents = self._extents
        if extents is None:
            extents = await with_retries(policy, self._clock, 0, size, self._source.extents)
        wanted = normalized(extents, size)
        first_round, resumed = await self._load_checkpoint()
        planned = measure(wanted, self._table)
        self._counters.chunks_skipped = planned.done_chunks
        self._meter = meter = ProgressMeter(
            self.transfer_id, self._clock, bytes_total=planned.bytes, chunks_total=planned.chunks
        )
        meter.add(planned.done_bytes, planned.done_chunks, worked=False)
        self._log.info(
            "transfer starting",
            chunks=planned.chunks,
            skipped=planned.done_chunks,
            resumed=resumed,
        )
        writer = CheckpointWriter(
            self._store, self._flush_target, first_round=first_round, clock=self._clock
        )
        started = time.monotonic()
        await self._copy(writer, wanted, meter)
        self._copy_s = time.monotonic() - started
        stopped = self._stop.is_set()
        meter.phase = TransferPhase.COPYING if stopped else TransferPhase.CHECKING
        source_digest, target_digest = await self._finish(writer, check=not stopped)
        if stopped:
            raise TransferCancelled(self.transfer_id, meter.chunks_done, meter.chunks_total)
        if target_digest is not None:
            await self._store.mark_complete(target_digest)
        meter.phase = TransferPhase.DONE
        if self._progress is not None:
            self._progress(meter.snapshot())
        self._log.info("transfer done", **asdict(self.stats))
        return TransferResult(
            self.transfer_id,
            self.stats,
            source_digest,
            target_digest,
            certified=self._options.certify,
            resumed=resumed,
        )

    async def _load_checkpoint(self) -> tuple[int, bool]:
        """Fill the chunk table from an earlier run; returns (first round, resumed)."""
        meta = CheckpointMeta(self._source.size, self._options.chunk_size, HASH_NAME)
        checkpoint = await self._store.load()
        if checkpoint is None or checkpoint.meta != meta:
            if checkpoint is not None:
                self._log.warning("checkpoint is for another layout; starting over")
            await self._store.begin(meta)
            return 1, False
        pending: list[int] = []
        for record in checkpoint.records:
            if record.index >= self._table.count:
                continue
            length = self._table.bounds(record.index)[1]
            digest = record.digest if record.digest is not None else zero_hash(length)
            if record.round <= checkpoint.durable_round:
                self._table.set(record.index, digest, ChunkState.DURABLE)
            else:
                self._table.set(record.index, digest, ChunkState.PENDING)
                pending.append(record.index)
        # Until re-verified, pending chunks must not be blessed by the next durable mark.
        await self._store.forget(pending)
        return checkpoint.durable_round + 1, True

    async def _flush_target(self) -> None:
        await with_retries(
            self._options.retry, self._clock, 0, self._target.size, self._target.flush
        )

    async def _copy(
        self, writer: CheckpointWriter, wanted: list[Extent], meter: ProgressMeter
    ) -> None:
        """Every planned chunk written and verified (or a stop honoured); not yet flushed."""
        options = self._options
        copier = ChunkCopier(self._context(writer, meter), self._counters)
        work = plan(wanted, self._table, options.max_zero_run, options.max_data_run)
        try:
            async with asyncio.TaskGroup() as group:
                background = [
                    group.create_task(writer.record_forever()),
                    group.create_task(writer.sync_every(options.flush_interval_s)),
                ]
                if self._progress is not None:
                    background.append(
                        group.create_task(
                            meter.report_every(options.progress_interval_s, self._progress)
                        )
                    )
                try:
                    await run_bounded(work, copier.copy, workers=options.workers, stop=self._stop)
                finally:
                    writer.stop()  # ends its loops even if a cancellation below gets lost
                    for task in background:
                        task.cancel()
        except BaseException:
            await self._last_sync(writer)
            raise

    async def _finish(
        self, writer: CheckpointWriter, *, check: bool
    ) -> tuple[bytes | None, bytes | None]:
        """The last target flush and, unless stopped, the whole-image check, side by side.

        Neither changes what the other sees: the flush only makes the target's
        bytes durable, the check only reads them. Both end before ``run`` marks
        the checkpoint complete.
        """
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._final_sync(writer))
                digests = group.create_task(self._timed_check()) if check else None
        except BaseException:
            await self._last_sync(writer)
            raise
        return (None, None) if digests is None else digests.result()

    async def _final_sync(self, writer: CheckpointWriter) -> None:
        started = time.monotonic()
        await writer.sync()
        self._sync_s = time.monotonic() - started

    async def _timed_check(self) -> tuple[bytes | None, bytes | None]:
        if not (self._options.whole_image_check or self._options.certify):
            return None, None  # check_s stays 0.0: nothing was checked
        started = time.monotonic()
        digests = await self._check_image()
        self._check_s = time.monotonic() - started
        return digests

    async def _last_sync(self, writer: CheckpointWriter) -> None:
        """Best effort after a failure or cancellation: keep what was verified."""
        try:
            async with asyncio.timeout(self._options.final_sync_timeout_s):
                await writer.sync()
        except Exception as error:
            self._log.warning("checkpoint not synced", error=f"{type(error).__name__}: {error}")

    def _context(self, writer: CheckpointWriter, meter: ProgressMeter) -> CopyContext:
        return CopyContext(
            source=self._source,
            target=self._target,
            table=self._table,
            writer=writer,
            meter=meter,
            bandwidth=self._bandwidth,
            source_io=self._source_io,
            target_hasher=self._target_hasher,
            policy=self._options.retry,
            clock=self._clock,
            verify=self._options.verify_chunks,
            target_is_zero=self._options.target_is_zero,
            buffers=self._buffers,
        )

    async def _check_image(self) -> tuple[bytes, bytes]:
        """Whole-image digests of source and target; CertificationFailed names a difference."""
        options = self._options
        size, chunk_size = self._source.size, options.chunk_size
        source_table = ChunkTable(size, chunk_size) if options.certify else self._table
        target_table = ChunkTable(size, chunk_size)

        def source_needed(index: int) -> bool:
            return source_table.state(index) == ChunkState.NONE

        async with asyncio.TaskGroup() as group:
            group.create_task(
                hash_image(
                    self._source,
                    self._source_hasher,
                    source_table,
                    needed=source_needed,
                    workers=self._source_io.limit,
                    policy=options.retry,
                    clock=self._clock,
                )
            )
            group.create_task(
                hash_image(
                    self._target,
                    self._target_hasher,
                    target_table,
                    needed=lambda index: True,
                    workers=options.workers,
                    policy=options.retry,
                    clock=self._clock,
                )
            )
        differs = first_difference(source_table, target_table)
        if differs is not None:
            start, length = source_table.bounds(differs)
            raise CertificationFailed(start, length)
        return image_digest(source_table), image_digest(target_table)
