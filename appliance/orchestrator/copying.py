"""The transfer step: every disk of the VM's snapshot into a cloud volume, over NBD.

Disks go one after the other (each transfer has its own fixed pool of
workers; running them side by side would multiply memory, not speed). The
engine checkpoints each disk in Redis, so a restarted step skips what is
durable. Progress is written to the record and published every
``progress_interval_s``; a cancel stops the engine at the next chunk.

The bandwidth cap is live: one token bucket serves the migration's disks, and
every progress interval its rate is set again from the request's cap and the
policy's (the lower wins), so a SetPolicyRequest reaches running transfers.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections.abc import Mapping
from dataclasses import dataclass, replace

from appliance.datapath.nbd.backend import NbdBackend
from appliance.datapath.progress import TransferProgress
from appliance.datapath.throttle import QueueDepthLimiter, TokenBucket
from appliance.datapath.transfer import Transfer, TransferOptions
from appliance.errors import OutOfSpace
from appliance.orchestrator import tags
from appliance.orchestrator.context import Deps
from appliance.orchestrator.journal import Journal
from appliance.orchestrator.record import DiskPlan, MigrationRecord
from appliance.orchestrator.steps import transfer_id
from appliance.state.policy import MBPS, lower_cap
from appliance.storage.backend import Backend
from appliance.storage.extents import allocated_length
from messages.common import VerifyMode


@dataclass
class _Progress:
    """The latest figures, written by the engine's callback, read by the reporter task."""

    done_before: int = 0  # bytes of disks already finished
    current: TransferProgress | None = None

    @property
    def bytes_done(self) -> int:
        return self.done_before + (self.current.bytes_done if self.current else 0)


async def planned_bytes(source: Backend) -> int:
    """What the copy will move: allocated runs (data and zeroes), never holes."""
    return allocated_length(await source.extents())


class DiskCopy:
    """Copies the disks of one migration; ``stop()`` asks it to stop at the next chunk."""

    def __init__(
        self,
        deps: Deps,
        journal: Journal,
        record: MigrationRecord,
        cancelled: asyncio.Event,
        sources: Mapping[str, Backend] | None = None,
    ) -> None:
        """``sources``: each disk's snapshot by disk id, when not read from the on-prem site
        (a warm migration reads it from the I/O manager, which holds the disks)."""
        self._deps = deps
        self._sources = sources
        self._journal = journal
        self._record = record
        self._cancelled = cancelled
        self._progress = _Progress()
        self._writing = asyncio.Lock()  # one writer of the record at a time
        self._bandwidth = TokenBucket(clock=deps.clock)  # every disk's, adjusted live
        self._copied = asyncio.Event()  # tells the reporter to stop (it is never cancelled)

    async def _save(self, record: MigrationRecord | None = None, **changes: object) -> None:
        async with self._writing:
            base = record if record is not None else self._record
            self._record = await self._journal.update(base, **changes)

    async def run(self) -> MigrationRecord:
        record = self._record
        onprem = self._deps.site(record.site)
        sources = dict(self._sources or {})
        for d in record.disks:
            if d.disk_id not in sources:
                sources[d.disk_id] = await onprem.open_disk(record.vm_id, d.disk_id, d.snapshot_id)
        if record.bytes_total == 0:
            disks = [
                replace(d, bytes_to_copy=await planned_bytes(sources[d.disk_id]))
                for d in record.disks
            ]
            await self._save(disks=tuple(disks), bytes_total=sum(d.bytes_to_copy for d in disks))
        await self._apply_cap()
        reporter = asyncio.create_task(self._report())
        try:
            for disk in self._record.disks:
                if disk.target_digest is None:
                    copied = await self._copy(disk, sources[disk.disk_id])
                    await self._save(self._record.with_disk(copied))
                self._progress.done_before += disk.bytes_to_copy
                self._progress.current = None
        finally:
            # Not cancelled: a task cancelled in the middle of a Redis command can hang or
            # carry on (redis-py on Python 3.11); it ends after its current report instead.
            self._copied.set()
            await reporter
        await self._save(bytes_done=self._record.bytes_total, eta_seconds=0.0)
        return self._record

    async def _copy(self, disk: DiskPlan, source: Backend) -> DiskPlan:
        record = self._record
        cloud = self._deps.site(record.target_site)
        try:
            await cloud.create_volume(
                disk.volume_id,
                disk.capacity_bytes,
                tags={tags.MIGRATION: record.migration_id, tags.SOURCE_VM: record.vm_id},
            )
        except OSError as error:
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise OutOfSpace(f"volume {disk.volume_id!r}", disk.capacity_bytes) from error
        address, export = await self._deps.cloud.export(disk.volume_id)
        target = await NbdBackend.connect(address, export, name=f"cloud:{disk.volume_id}")
        options = record.options
        transfer = Transfer(
            transfer_id(record, disk.disk_id),
            source,
            target,
            checkpoints=self._journal.checkpoints(transfer_id(record, disk.disk_id)),
            options=TransferOptions(
                chunk_size=options.chunk_size,
                workers=self._deps.config.transfer_workers,
                certify=options.verify is VerifyMode.CERTIFY,
                # A fresh volume; resumed chunks are skipped or re-sent. A volume kept from an
                # earlier attempt holds data where the new snapshot may have zeroes.
                target_is_zero=record.attempt == 0,
            ),
            bandwidth=self._bandwidth,
            source_io=QueueDepthLimiter(options.io_queue_depth),
            buffers=self._deps.buffers,
            progress=self._on_progress,
        )
        stopper = asyncio.create_task(self._stop_on_cancel(transfer))
        try:
            result = await transfer.run()
        finally:
            stopper.cancel()
            await target.close()
        stats = result.stats
        await self._deps.events.append(
            "disk_copied",
            self._deps.clock.now().isoformat(),
            migration_id=record.migration_id,
            disk_id=disk.disk_id,
            attempt=record.attempt,
            chunks_copied=stats.chunks_copied,
            chunks_zero=stats.chunks_zero,
            chunks_skipped=stats.chunks_skipped,
            chunks_reverified=stats.chunks_reverified,
            bytes_written=stats.bytes_written,
        )
        return replace(
            disk,
            source_digest=result.source_digest.hex() if result.source_digest else None,
            target_digest=result.target_digest.hex() if result.target_digest else None,
        )

    async def _apply_cap(self) -> float | None:
        """Set the bucket's rate from the request and the policy in force now; the rate."""
        record = self._record
        policy = await self._deps.policies.for_clusters(
            record.source_cluster, record.target_cluster
        )
        from_policy = policy.bandwidth_cap_mbps * MBPS if policy.bandwidth_cap_mbps else None
        cap = lower_cap(record.options.bandwidth_cap_bps, from_policy)
        if cap != self._bandwidth.rate:
            self._bandwidth.set_rate(cap)
        if self._bandwidth.rate != record.bandwidth_cap_bps:
            # What clients see is the bucket's own rate: the cap the throttle applies.
            await self._save(bandwidth_cap_bps=self._bandwidth.rate)
        return cap

    def _on_progress(self, progress: TransferProgress) -> None:
        self._progress.current = progress

    async def _stop_on_cancel(self, transfer: Transfer) -> None:
        await self._cancelled.wait()
        transfer.stop()

    async def _report(self) -> None:
        """Persist and publish progress every interval while the copy runs."""
        interval = self._deps.config.progress_interval_s
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._copied.wait()
            if self._copied.is_set():
                return
            current = self._progress.current
            total = self._record.bytes_total
            done = min(self._progress.bytes_done, total)
            rate = current.rate_bytes_per_s if current else 0.0
            eta = (total - done) / rate if rate > 0 else None
            await self._apply_cap()
            await self._save(bytes_done=done, rate_bytes_per_s=rate, eta_seconds=eta)
            await self._deps.reporter.publish(self._record, self._cancelled.is_set())
