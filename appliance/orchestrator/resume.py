"""Resuming a migration whose failure kept its data: a SyncRequest on it re-queues it.

A cold migration that ran out of space at the target fails cleanly (the
source VM is restored), but its rollback keeps what the transfer made durable
in the cloud volumes, their checkpoints and the source snapshot it copied
from (``MigrationRecord.keep_for_resume``). Once space is freed, a
SyncRequest naming it re-queues its whole dependency group (FAILED ->
QUEUED, ``attempt`` + 1); the run then goes through the cold steps again:

* its snapshot step takes a new snapshot (the VM may have run since), asks
  the site which blocks changed between the old snapshot and the new one,
  forgets those chunks in the checkpoints, then drops the old snapshot;
* its transfer skips every chunk still durable at the target and copies the
  rest (the volume is not assumed to read as zeroes any more).

SyncRequest on anything else answers ``not_implemented`` (the incremental
sync of warm migrations is not built) or ``conflict`` (a failure that kept
nothing: start a new migration). A CancelRequest on such a failed migration
discards what it kept instead (volumes, checkpoints, snapshot): then nothing of
it is left anywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from appliance.errors import CommandRejected, Conflict
from appliance.logs import get_logger
from appliance.orchestrator import steps
from appliance.orchestrator.context import Deps
from appliance.orchestrator.journal import Journal
from appliance.orchestrator.record import MigrationRecord, load
from appliance.orchestrator.states import TERMINAL, Step
from appliance.state.leases import Lease
from appliance.storage.extents import Extent
from messages.errors import ErrorCode

log = get_logger(__name__)


def resumable(record: MigrationRecord) -> bool:
    return record.step is Step.FAILED and record.keep_for_resume


def requeued(record: MigrationRecord) -> bool:
    """Re-queued by an earlier SyncRequest (whose group may not be active yet: a crash)."""
    return record.step is Step.QUEUED and record.attempt > 0


def chunk_indices(extents: list[Extent], chunk_size: int) -> list[int]:
    """Every chunk index a set of byte ranges touches."""
    indices: set[int] = set()
    for extent in extents:
        if extent.length:
            indices.update(range(extent.start // chunk_size, (extent.end - 1) // chunk_size + 1))
    return sorted(indices)


async def snapshot_step(deps: Deps, journal: Journal, record: MigrationRecord) -> MigrationRecord:
    """The snapshot step: a first attempt snapshots; a resumed one re-bases its checkpoints."""
    if record.attempt == 0:
        return await steps.snapshot(deps, journal, record)
    return await _resnapshot(deps, journal, record)


async def _resnapshot(deps: Deps, journal: Journal, record: MigrationRecord) -> MigrationRecord:
    """A new snapshot; chunks that changed since the kept one are forgotten. Idempotent."""
    onprem = deps.site(record.site)
    taken = await onprem.snapshot_vm(record.vm_id, steps.snapshot_name(record))
    if record.snapshot_name != taken.name:  # not yet re-based (else a rerun after a crash)
        for disk in record.disks:
            if disk.snapshot_id is None:
                continue
            changed = await onprem.changed_extents(
                record.vm_id, disk.disk_id, disk.snapshot_id, taken.of(disk.disk_id)
            )
            stale = chunk_indices(changed, record.options.chunk_size)
            await journal.checkpoints(steps.transfer_id(record, disk.disk_id)).forget(stale)
            log.info(
                "resume re-based",
                migration_id=record.migration_id,
                disk_id=disk.disk_id,
                chunks_changed=len(stale),
            )
        disks = tuple(
            replace(
                d,
                snapshot_id=taken.of(d.disk_id),
                bytes_to_copy=0,
                source_digest=None,
                target_digest=None,
            )
            for d in record.disks
        )
        record = await journal.update(
            record, disks=disks, snapshot_name=taken.name, bytes_total=0, bytes_done=0
        )
    for attempt in range(record.attempt):  # earlier attempts' snapshots; gone already is fine
        old = steps.snapshot_name(replace(record, attempt=attempt))
        await onprem.delete_vm_snapshot(record.vm_id, old)
    return record


class Resumes:
    """SyncRequest: re-queue failed migrations that kept their data, whole groups at once."""

    def __init__(self, deps: Deps, group_lease: Callable[[str], str]) -> None:
        self._deps = deps
        self._group_lease = group_lease  # the resource a group's run holds (the scheduler's)

    async def requeue(self, migration_ids: list[str]) -> list[MigrationRecord]:
        migrations = self._deps.migrations
        chosen = [load(s.record) for s in await migrations.get_many(migration_ids)]
        _check_resumable(chosen)
        requeued_records: list[MigrationRecord] = []
        for group_id in dict.fromkeys(r.group_id for r in chosen):
            requeued_records += await self._requeue_group(group_id)
        return requeued_records

    async def _requeue_group(self, group_id: str) -> list[MigrationRecord]:
        deps = self._deps
        info = await deps.migrations.group(group_id)
        if info is None:
            raise Conflict(f"group {group_id} is gone")
        lease = await deps.leases.acquire(self._group_lease(group_id))
        if lease is None:
            raise Conflict(f"group {group_id} is being worked on; try again")
        try:
            members = [load(s.record) for s in await deps.migrations.get_many(list(info.members))]
            _check_resumable(members)
            await self._lock_all(members)
            records = [await self._requeue_member(lease, m) for m in members]
            await deps.migrations.requeue_group(group_id, await deps.migrations.next_admission())
        finally:
            await deps.leases.release(lease)
        log.info("group re-queued", group_id=group_id, attempt=records[0].attempt)
        return records

    async def discard(self, migration_ids: list[str]) -> list[MigrationRecord]:
        """Drop what failed migrations kept for a resume, whole groups at once."""
        migrations = self._deps.migrations
        chosen = [load(s.record) for s in await migrations.get_many(migration_ids)]
        discarded: list[MigrationRecord] = []
        for group_id in dict.fromkeys(r.group_id for r in chosen):
            info = await migrations.group(group_id)
            members = list(info.members) if info is not None else []
            lease = await self._deps.leases.acquire(self._group_lease(group_id))
            if lease is None:
                raise Conflict(f"group {group_id} is being worked on; try again")
            try:
                for stored in await migrations.get_many(members):
                    record = load(stored.record)
                    if resumable(record):
                        discarded.append(await self._discard(Journal(self._deps, lease), record))
            finally:
                await self._deps.leases.release(lease)
        return discarded

    async def _discard(self, journal: Journal, record: MigrationRecord) -> MigrationRecord:
        deps = self._deps
        cloud = deps.site(record.target_site)
        for disk in record.disks:
            await deps.cloud.unexport(disk.volume_id)
            await cloud.delete_volume(disk.volume_id)
            await journal.checkpoints(steps.transfer_id(record, disk.disk_id)).delete()
        if record.snapshot_name is not None:
            onprem = deps.site(record.site)
            await onprem.delete_vm_snapshot(record.vm_id, record.snapshot_name)
            if await deps.migrations.lock_holder(record.site, record.vm_id) is None:
                await onprem.release(record.vm_id)  # no other migration uses its disks
        log.info("kept data discarded", migration_id=record.migration_id)
        return await journal.update(record, keep_for_resume=False)

    async def _lock_all(self, members: list[MigrationRecord]) -> None:
        """Each VM back to its migration, or none: another may have taken one meanwhile."""
        migrations = self._deps.migrations
        taken: list[MigrationRecord] = []
        for record in members:
            holder = await migrations.lock_vm(
                record.site,
                record.vm_id,
                record.migration_id,
                pending_s=None,  # the record exists: the lock holds until it finishes
                finished=[step.value for step in TERMINAL],
            )
            if holder != record.migration_id:
                for done in taken:
                    await migrations.unlock_vm(done.site, done.vm_id, done.migration_id)
                raise Conflict(f"VM {record.vm_name!r} ({record.vm_id}) is in migration {holder}")
            taken.append(record)

    async def _requeue_member(self, lease: Lease, record: MigrationRecord) -> MigrationRecord:
        if requeued(record):
            return record
        return await Journal(self._deps, lease).advance(
            record,
            Step.QUEUED,
            attempt=record.attempt + 1,
            keep_for_resume=False,
            rollback_to=None,
            error_code=None,
            error_message=None,
            bytes_done=0,
            rate_bytes_per_s=0.0,
            eta_seconds=None,
            bandwidth_cap_bps=None,
        )


def _check_resumable(records: list[MigrationRecord]) -> None:
    lost = [r for r in records if r.step is Step.FAILED and not r.keep_for_resume]
    if lost:
        listed = ", ".join(r.migration_id for r in lost)
        raise Conflict(
            f"cannot resume {listed}: its failure kept no data; send a new SourceCloneRequest"
        )
    other = [r for r in records if not (resumable(r) or requeued(r))]
    if other:
        listed = ", ".join(f"{r.migration_id} is {r.step.value}" for r in other)
        raise CommandRejected(
            f"SyncRequest resumes failed migrations that kept their data (out of space); "
            f"the incremental sync of running migrations is not implemented yet: {listed}",
            ErrorCode.NOT_IMPLEMENTED,
        )
