"""The cold workflow's steps. Each runs *in* its step (already persisted) and is idempotent:
after a crash it is run again from the top and finds what it already did.
"""

from __future__ import annotations

from dataclasses import replace

from appliance.errors import CertificationFailed, PrecheckFailed
from appliance.logs import get_logger
from appliance.orchestrator import tags
from appliance.orchestrator.context import Deps
from appliance.orchestrator.journal import Journal
from appliance.orchestrator.prechecks import (
    PrecheckFacts,
    needs_credentials,
    run_checks,
    target_network,
)
from appliance.orchestrator.record import DiskPlan, MigrationRecord
from appliance.sites.model import DiskConfig, NicConfig, VmConfig
from appliance.state.store import text
from messages.common import PowerState, ToolsStatus

log = get_logger(__name__)


def snapshot_name(record: MigrationRecord) -> str:
    return tags.snapshot_name(record.migration_id, record.attempt)


async def prepare(deps: Deps, journal: Journal, record: MigrationRecord) -> MigrationRecord:
    onprem = deps.site(record.site)
    cloud = deps.site(record.target_site)
    vm = await onprem.get_vm(record.vm_id)
    secret_key = deps.store.keys.secret(record.migration_id)
    sealed = await deps.store.run(lambda r: r.get(secret_key))
    facts = PrecheckFacts(
        vm=vm,
        lock_holder=await deps.migrations.lock_holder(record.site, record.vm_id),
        migration_id=record.migration_id,
        target=await cloud.config(),
        target_free_bytes=await cloud.free_bytes(),
        network_map=dict(record.network_map),
        has_credentials=sealed is not None or record.guest_prepared,
    )
    checks = run_checks(facts)
    # Keep what to restore on rollback, unless an earlier run already did (it saw the truth).
    prior_power = record.prior_power or vm.power_state
    prior_pool = record.prior_pool or vm.resource_pool
    record = await journal.update(
        record, checks=checks, prior_power=prior_power, prior_pool=prior_pool
    )
    # The same facts on the VM itself, before anything changes it: found even if Redis is lost.
    if tags.pending_migration(vm) != record.migration_id:
        await onprem.tag_vm(
            vm.vm_id,
            {
                tags.MIGRATION: record.migration_id,
                tags.PRIOR_POWER: prior_power.value,
                tags.PRIOR_POOL: prior_pool,
                tags.STAGE: None,
                tags.REQUEST: tags.RequestTag(
                    record.request_id,
                    record.correlation_id,
                    record.group_id,
                    record.migration_type.value,
                ).value(),
            },
        )
    failed = [(check.name, check.reason) for check in checks if not check.passed]
    if failed:
        raise PrecheckFailed(vm.name, failed)
    if sealed is not None and needs_credentials(vm) and not record.guest_prepared:
        with deps.sealer.opened(text(sealed)) as login:  # used and dropped
            await onprem.prepare_guest(vm.vm_id, login.username, login.password)
        record = await journal.update(record, guest_prepared=True)
    await journal.delete_secret(record)
    return record


async def power_off(deps: Deps, journal: Journal, record: MigrationRecord) -> MigrationRecord:
    onprem = deps.site(record.site)
    vm = await onprem.get_vm(record.vm_id)
    if vm.power_state is not PowerState.OFF:
        await onprem.set_power(record.vm_id, PowerState.OFF)
    return record


async def snapshot(deps: Deps, journal: Journal, record: MigrationRecord) -> MigrationRecord:
    taken = await deps.site(record.site).snapshot_vm(record.vm_id, snapshot_name(record))
    disks = tuple(replace(d, snapshot_id=taken.of(d.disk_id)) for d in record.disks)
    return await journal.update(record, disks=disks, snapshot_name=taken.name)


async def verify(deps: Deps, journal: Journal, record: MigrationRecord) -> MigrationRecord:
    """Every disk's whole-image digest at the target equals the source snapshot's."""
    for disk in record.disks:
        if disk.source_digest is None or disk.source_digest != disk.target_digest:
            raise CertificationFailed(0, disk.capacity_bytes)
    return record


def _cloud_disk(disk: DiskPlan) -> DiskConfig:
    """On its volume, or on the cache's export when a cache serves it (tbc)."""
    if disk.cache_export is not None:
        export = f"nbd://{disk.cache_address}/{disk.cache_export}"
        return DiskConfig(
            disk.disk_id, disk.label, disk.capacity_bytes, disk.boot, nbd_export=export
        )
    return DiskConfig(
        disk.disk_id, disk.label, disk.capacity_bytes, disk.boot, volume_id=disk.volume_id
    )


def cloud_vm(record: MigrationRecord, vm: VmConfig, networks: dict[str, str]) -> VmConfig:
    return replace(
        vm,
        vm_id=record.migration_id,
        name=record.target_name,
        disks=tuple(_cloud_disk(d) for d in record.disks),
        nics=tuple(NicConfig(n.nic_id, n.mac, networks[n.network]) for n in vm.nics),
        resource_pool=record.target_pool or "migrated",
        cluster="cloud-cluster",
        power_state=PowerState.OFF,
        tools_status=ToolsStatus.NOT_RUNNING,
        annotations=(("ferry.migration_id", record.migration_id), ("ferry.source_vm", vm.vm_id)),
    )


async def create_target(deps: Deps, journal: Journal, record: MigrationRecord) -> MigrationRecord:
    cloud = deps.site(record.target_site)
    vm = await deps.site(record.site).get_vm(record.vm_id)
    target = await cloud.config()
    mapping = dict(record.network_map)
    networks = {
        nic.network: target_network(nic.network, mapping, target) or "cloud-default"
        for nic in vm.nics
    }
    for disk in record.disks:
        await deps.cloud.unexport(disk.volume_id)
    created = await cloud.create_vm(cloud_vm(record, vm, networks))
    return await journal.update(record, cloud_vm_id=created.vm_id)


async def power_on(deps: Deps, journal: Journal, record: MigrationRecord) -> MigrationRecord:
    if record.options.power_on_target and record.cloud_vm_id is not None:
        await deps.site(record.target_site).set_power(record.cloud_vm_id, PowerState.ON)
    return record


async def finalize(deps: Deps, journal: Journal, record: MigrationRecord) -> MigrationRecord:
    """The on-prem VM, powered off, goes to the migrate pool; our snapshot and checkpoints go."""
    onprem = deps.site(record.site)
    # First: past this point the cloud copy is the finished one, whatever happens to Redis.
    await onprem.tag_vm(record.vm_id, {tags.STAGE: tags.CUTOVER})
    await onprem.move_to_pool(record.vm_id, deps.config.migrate_pool)
    if record.snapshot_name is not None:
        await onprem.delete_vm_snapshot(record.vm_id, record.snapshot_name)
    for disk in record.disks:
        await journal.checkpoints(transfer_id(record, disk.disk_id)).delete()
    await onprem.tag_vm(record.vm_id, tags.cleared())
    await _release(deps, record)
    return record


async def _release(deps: Deps, record: MigrationRecord) -> None:
    """Close the disks this migration opened, on both sites, before it is reported done."""
    await deps.site(record.site).release(record.vm_id)
    await deps.site(record.target_site).release(record.cloud_vm_id or record.migration_id)


def transfer_id(record: MigrationRecord, disk_id: str) -> str:
    return f"{record.migration_id}/{disk_id}"


async def rollback(deps: Deps, journal: Journal, record: MigrationRecord) -> MigrationRecord:
    """Leave the source as it was and nothing half-made in the cloud. Idempotent.

    A rollback that keeps for a resume (``keep_for_resume``: out of space) keeps
    the copied volumes (detached, unexported), their checkpoints and the source
    snapshot they were copied from: a SyncRequest resumes from them.
    """
    cloud = deps.site(record.target_site)
    onprem = deps.site(record.site)
    # The cloud VM's id is the migration id, so even one created just before a crash
    # (and never written down) is found.
    await cloud.delete_vm(record.cloud_vm_id or record.migration_id)
    for disk in record.disks:
        await deps.cloud.unexport(disk.volume_id)
        if not record.keep_for_resume:
            await cloud.delete_volume(disk.volume_id)
            await journal.checkpoints(transfer_id(record, disk.disk_id)).delete()
    await journal.delete_secret(record)
    if record.snapshot_name is not None and not record.keep_for_resume:
        await onprem.delete_vm_snapshot(record.vm_id, record.snapshot_name)
    vm = await onprem.get_vm(record.vm_id)
    if record.prior_pool is not None and vm.resource_pool != record.prior_pool:
        await onprem.move_to_pool(record.vm_id, record.prior_pool)
    if record.prior_power is PowerState.ON and vm.power_state is not PowerState.ON:
        await onprem.set_power(record.vm_id, PowerState.ON)
    if tags.pending_migration(vm) == record.migration_id:
        await onprem.tag_vm(record.vm_id, tags.cleared())  # last: the source is as it was
    await journal.unlock_vm(record)
    await _release(deps, record)
    log.info("rolled back", migration_id=record.migration_id)
    return record
