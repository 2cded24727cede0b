"""The steps of a VM that runs on the components (tbc): open its disks, park the on-prem VM,
and the way back. Each runs *in* its step (already persisted) and is idempotent: after a
crash it runs again from the top and finds what it already did (orders are desired state,
carried out once; site calls are idempotent).

Migrate back, step by step (the group takes each step together):

* BACK_POWERING_OFF: the cloud VM powers off (its guest stops writing);
* BACK_FINAL_EPOCH: one more epoch is cut on every disk and committed on-prem, so
  nothing the guest wrote is lost;
* BACK_REMOVING_CLOUD: the cloud VM goes, the cache stops serving its disks;
* BACK_RESTORING_DISKS: the I/O manager lets go of the disk, whose active layer is its
  current image (snapshot + every committed epoch): checked whole against the digest
  of the image it served;
* BACK_RETURNING: the on-prem VM returns to its original pool, powered off unless the
  request said on; the migrate-time snapshot goes unless the request kept it.
"""

from __future__ import annotations

from dataclasses import replace

from appliance.clock import SystemClock
from appliance.components.cache.cache import Discard
from appliance.components.epochs import parse_address
from appliance.datapath.chunks import ChunkTable
from appliance.datapath.imagecheck import RangeHasher, hash_image, image_digest
from appliance.datapath.nbd import NbdBackend
from appliance.errors import CertificationFailed, CommandRejected
from appliance.logs import get_logger
from appliance.orchestrator import tags
from appliance.orchestrator.context import Deps
from appliance.orchestrator.journal import Journal
from appliance.orchestrator.record import DiskPlan, MigrationRecord
from appliance.orchestrator.serving import ServedDisks, component_disk
from appliance.retrying import RetryPolicy
from appliance.storage.backend import Backend
from messages.common import PowerState
from messages.errors import ErrorCode

log = get_logger(__name__)


def served(deps: Deps, journal: Journal) -> ServedDisks:
    return ServedDisks(deps, journal.lease)


async def open_disks(deps: Deps, journal: Journal, record: MigrationRecord) -> MigrationRecord:
    """The I/O manager opens each disk at its snapshot; the cache serves it on top."""
    onprem = deps.site(record.site)
    await onprem.release(record.vm_id)  # the I/O manager takes the disks over
    disks = served(deps, journal)
    for disk in record.disks:
        location = onprem.disk_location(record.vm_id, disk.disk_id)
        address = await disks.open_onprem(record, disk, location)
        # The cache reaches on-prem across the WAN: at a gateway's address when one is set.
        opened = await disks.open_cache(record, disk, deps.config.wan_upstream or address)
        changed = replace(
            disk, onprem_address=address, cache_address=opened.address, cache_export=opened.export
        )
        record = await journal.update(record, disks=_with(record, changed))
    return record


async def park(deps: Deps, journal: Journal, record: MigrationRecord) -> MigrationRecord:
    """The on-prem VM, powered off, waits in the migrate pool while its twin runs in the cloud."""
    await deps.site(record.site).move_to_pool(record.vm_id, deps.config.migrate_pool)
    return record


async def not_built(deps: Deps, journal: Journal, record: MigrationRecord) -> MigrationRecord:
    raise CommandRejected(
        f"{record.step.value} of a {record.migration_type.value} migration is not built yet",
        ErrorCode.NOT_IMPLEMENTED,
    )


# -- migrate back --------------------------------------------------------------------------------


async def back_power_off(deps: Deps, journal: Journal, record: MigrationRecord) -> MigrationRecord:
    cloud = deps.site(record.target_site)
    vm_id = record.cloud_vm_id or record.migration_id
    vm = await cloud.get_vm(vm_id)
    if vm.power_state is not PowerState.OFF:
        await cloud.set_power(vm_id, PowerState.OFF)
    return record


async def cut_all(
    disks: ServedDisks, journal: Journal, record: MigrationRecord
) -> tuple[MigrationRecord, list[tuple[DiskPlan, int]]]:
    """One more epoch on every disk (the counter persisted first: a rerun asks again for
    the same cut, never for another)."""
    bumped = tuple(replace(d, epoch_requests=d.epoch_requests + 1) for d in record.disks)
    record = await journal.update(record, disks=bumped)
    return await cut_asked(disks, journal, record)


async def cut_asked(
    disks: ServedDisks, journal: Journal, record: MigrationRecord
) -> tuple[MigrationRecord, list[tuple[DiskPlan, int]]]:
    """The cuts the persisted counters ask for; the epochs they made."""
    cuts = []
    for disk in record.disks:
        epoch = await disks.cut(record, disk, disk.epoch_requests)
        cuts.append((replace(disk, epoch_cut=epoch), epoch))
    now = journal.now()
    record = await journal.update(record, disks=tuple(d for d, _ in cuts), last_cut_at=now)
    return record, cuts


async def back_final_epoch(
    deps: Deps, journal: Journal, record: MigrationRecord
) -> MigrationRecord:
    """The cloud VM is off: one last epoch holds everything it wrote; committed on-prem."""
    disks = served(deps, journal)
    if not record.extra.get("final_cut"):
        record, _ = await cut_all(disks, journal, record)
        record = await journal.update(record, extra={**record.extra, "final_cut": True})
    else:
        record, _ = await cut_asked(disks, journal, record)
    wanted = [(d, d.epoch_cut) for d in record.disks]
    await disks.wait_committed(wanted, deps.config.epoch_commit_timeout_s)
    committed = tuple(replace(d, epoch_committed=d.epoch_cut) for d in record.disks)
    return await journal.update(record, disks=committed, last_commit_at=journal.now())


async def back_remove_cloud(
    deps: Deps, journal: Journal, record: MigrationRecord
) -> MigrationRecord:
    await deps.site(record.target_site).delete_vm(record.cloud_vm_id or record.migration_id)
    disks = served(deps, journal)
    for disk in record.disks:  # the final epoch is committed: nothing of it is only here
        await disks.close_cache(record, disk, Discard.IF_CLEAN)
    return record


async def back_restore_disks(
    deps: Deps, journal: Journal, record: MigrationRecord
) -> MigrationRecord:
    """The I/O manager's current image becomes the on-prem VM's disk, checked whole."""
    disks = served(deps, journal)
    for disk in record.disks:
        if disk.target_digest is None:  # the image the I/O manager serves, before it goes
            digest = await _served_digest(disk, record.options.chunk_size)
            record = await journal.update(
                record, disks=_with(record, replace(disk, target_digest=digest))
            )
    for disk in record.disks:
        await disks.close_onprem(record, disk)
    onprem = deps.site(record.site)
    for disk in record.disks:
        backend = await onprem.open_disk(record.vm_id, disk.disk_id)
        found = await _digest(backend, record.options.chunk_size)
        if found != disk.target_digest:
            raise CertificationFailed(0, disk.capacity_bytes)
        checked = replace(disk, source_digest=found)
        record = await journal.update(record, disks=_with(record, checked))
    return record


async def back_return(deps: Deps, journal: Journal, record: MigrationRecord) -> MigrationRecord:
    onprem = deps.site(record.site)
    if record.snapshot_name is not None and not record.keep_snapshot:
        await onprem.delete_vm_snapshot(record.vm_id, record.snapshot_name)
    vm = await onprem.get_vm(record.vm_id)
    if record.prior_pool is not None and vm.resource_pool != record.prior_pool:
        await onprem.move_to_pool(record.vm_id, record.prior_pool)
    if record.back_power_on and vm.power_state is not PowerState.ON:
        await onprem.set_power(record.vm_id, PowerState.ON)
    if tags.pending_migration(vm) == record.migration_id:
        await onprem.tag_vm(record.vm_id, tags.cleared())
    await onprem.release(record.vm_id)
    await journal.unlock_vm(record)
    log.info("migrated back", migration_id=record.migration_id)
    return record


async def close_served(deps: Deps, journal: Journal, record: MigrationRecord) -> None:
    """A rollback: the cache and the I/O manager stop serving the disks (harmless if never
    opened), before anything on-prem opens them again."""
    disks = served(deps, journal)
    for disk in record.disks:
        await disks.close_cache(record, disk)
        await disks.close_onprem(record, disk)


async def _served_digest(disk: DiskPlan, chunk_size: int) -> str:
    if disk.onprem_address is None:
        raise CertificationFailed(0, disk.capacity_bytes)
    address = parse_address(disk.onprem_address)
    async with await NbdBackend.connect(address, f"cur/{component_disk(disk)}") as current:
        return await _digest(current, chunk_size)


async def _digest(backend: Backend, chunk_size: int) -> str:
    """The whole-image digest (hash of chunk hashes), as the transfer's check computes it."""
    table = ChunkTable(backend.size, chunk_size)
    await hash_image(
        backend,
        RangeHasher(backend),
        table,
        needed=lambda _: True,
        workers=4,
        policy=RetryPolicy(),
        clock=SystemClock(),
    )
    return image_digest(table).hex()


def _with(record: MigrationRecord, disk: DiskPlan) -> tuple[DiskPlan, ...]:
    return record.with_disk(disk).disks
