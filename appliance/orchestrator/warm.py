"""A warm migration's own steps, after tbc's first ones (the VM runs over the cache).
(Offline bulk transfer, exported at BULK_COPYING and imported at AWAITING_BULK:
``warm_offline.py``.)

* BULK_COPYING: the migrate-time snapshot, read from the I/O manager's ``snap/<disk>``
  export (it holds the on-prem disks now), into the cloud volumes (``<vm>_ARM``) with the
  transfer engine (``copying.DiskCopy``: verified, resumable, percent/bytes/rate/ETA).
* RECONCILING: reconcile passes on the cache (``components.reconciling``) while the guest
  writes: pass 1 copies every chunk written since the migration began, each next pass
  what was written during the last, until one leaves at most
  ``reconcile_threshold_bytes`` (or ``reconcile_max_passes`` were made: the last pass,
  with the VM off, copies the rest). The next pass number per disk is persisted after
  each pass, so a restarted run continues the count (the same number again answers the
  stored result; a pass the cache could not make for now is followed by the next one).
  Each pass's figures (percent, bytes, rate, ETA) are read from the cache's heartbeat
  while it runs and shown per pass (``reconcile_figures.py``).
* CUTTING_OVER: the cloud VM powers off, the last pass and the whole-image check (the
  cache's view against the volume; ``CertificationFailed`` names the first differing
  byte), its disks are swapped from the cache's exports to the volumes, it powers on.
  The cutover pass numbers are persisted before they are given: a rerun asks for the same.
* CUT_OVER (resting: no migration slot) until a CommitRequest asks ``commit``, then
  COMMITTING: the cache and the I/O manager let go of the disks (the cache removes them),
  the migrate-time snapshot and the checkpoints go, the source's tags are cleared; each
  part is idempotent, so a commit cut short runs again from the top (tests hold it
  between the two halves: ``holds.COMMIT``). Migrate back is refused from CUT_OVER on
  (``cut_over``). Once cut over the record shows the finished figures: every byte
  written into the volumes, at 100 %.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

from appliance.components.cache.cache import Discard
from appliance.components.cache.image import image_export
from appliance.components.cache.reconcile import PassResult, VolumeTarget
from appliance.components.control import ComponentOrders
from appliance.components.epochs import parse_address
from appliance.components.onprem.manager import snapshot_export
from appliance.components.orders import ComponentId
from appliance.components.reconciling import (
    ReconcileDisk,
    cutover_pass,
    reconcile_pass,
)
from appliance.datapath.nbd import NbdBackend
from appliance.errors import ComponentError, ReconcileUnavailable
from appliance.logs import get_logger
from appliance.orchestrator import holds, tags
from appliance.orchestrator import reconcile_figures as figures
from appliance.orchestrator.context import Deps
from appliance.orchestrator.copying import DiskCopy
from appliance.orchestrator.journal import Journal
from appliance.orchestrator.limits import may_leave_rest
from appliance.orchestrator.record import CUTOVER_SECONDS, DiskPlan, MigrationRecord
from appliance.orchestrator.serving import ServedDisks, component_disk
from appliance.orchestrator.states import Step
from appliance.orchestrator.steps import transfer_id
from appliance.orchestrator.warm_offline import export_bulk
from appliance.sites.model import DiskConfig
from appliance.storage.backend import Backend
from messages.common import MigrationType, PowerState

log = get_logger(__name__)

ASK_COMMIT = "commit"
ASK_CUTOVER = "cutover"  # tests only (``cutover_gate``): the guest has stopped writing
ASK_OFF = "cutover_off"  # tests only (``cutover_gate``): go on past the cloud VM's power-off
NEXT_PASS = "reconcile_next_pass"  # extra: {disk_id: the next pass number}
CUTOVER_PASS = "cutover_pass"  # extra: {disk_id: the cutover's pass number}
SWAPPED = "disks_swapped"  # extra: the cloud VM runs on its volumes


def _orders(deps: Deps) -> ComponentOrders:
    return ComponentOrders(deps.store, ComponentId.parse(deps.config.cache_component))


def _reconcile_disk(journal: Journal, record: MigrationRecord, disk: DiskPlan) -> ReconcileDisk:
    lease = journal.lease
    return ReconcileDisk(component_disk(disk), record.migration_id, lease.token, lease.resource)


async def _volume(deps: Deps, disk: DiskPlan) -> VolumeTarget:
    address, export = await deps.cloud.export(disk.volume_id)
    return VolumeTarget(address, export)


def _extra(record: MigrationRecord, key: str, disk_id: str, value: Any) -> dict[str, Any]:
    per_disk = dict(record.extra.get(key) or {})
    per_disk[disk_id] = value
    return {**record.extra, key: per_disk}


# -- BULK_COPYING --------------------------------------------------------------------------


async def bulk_copy(deps: Deps, journal: Journal, record: MigrationRecord) -> MigrationRecord:
    """The snapshot, as the I/O manager serves it, into the volumes (resumable)."""
    sources: dict[str, Backend] = {}
    try:
        for disk in record.disks:
            if disk.onprem_address is None:
                raise ComponentError(f"{disk.disk_id}: the I/O manager does not serve it")
            sources[disk.disk_id] = await NbdBackend.connect(
                parse_address(disk.onprem_address),
                snapshot_export(component_disk(disk)),
                name=f"onprem:snap/{disk.disk_id}",
            )
        if record.bulk_offline:  # a package to ship, imported at AWAITING_BULK
            return await export_bulk(deps, journal, record, sources)
        return await DiskCopy(deps, journal, record, asyncio.Event(), sources).run()
    finally:
        for source in sources.values():
            await source.close()


# -- RECONCILING ---------------------------------------------------------------------------


async def reconcile(deps: Deps, journal: Journal, record: MigrationRecord) -> MigrationRecord:
    """Passes until the remainder is under the threshold (and, in tests, the gate is open);
    each round's figures shown as it goes (``reconcile_figures``)."""
    config = deps.config
    orders = _orders(deps)
    made = 0
    while True:
        extra, live_round = figures.begin_round(record)
        record = await journal.update(record, extra=extra, **live_round.figures().changes())
        remainder = 0
        for disk in record.disks:
            record, result = await _pass(deps, journal, orders, record, disk, live_round)
            remainder += result.remainder_bytes if result is not None else disk.capacity_bytes
        made += 1
        await deps.reporter.publish(record, False)
        if remainder <= config.reconcile_threshold_bytes or made >= config.reconcile_max_passes:
            if await _may_cut_over(deps, record):
                log.info("reconciled", migration_id=record.migration_id, remainder=remainder)
                return record
            await deps.clock.sleep(config.resting_poll_s)


async def _gate(deps: Deps, record: MigrationRecord, ask: str) -> None:
    """Tests only (``cutover_gate``): hold here until ``ask`` is asked."""
    while deps.config.cutover_gate and ask not in await deps.migrations.asks(record.migration_id):
        await deps.clock.sleep(deps.config.resting_poll_s)


async def _may_cut_over(deps: Deps, record: MigrationRecord) -> bool:
    if not deps.config.cutover_gate:
        return True
    return ASK_CUTOVER in await deps.migrations.asks(record.migration_id)


def _next_pass(record: MigrationRecord, disk: DiskPlan) -> int:
    return int((record.extra.get(NEXT_PASS) or {}).get(disk.disk_id, 1))


async def _pass(
    deps: Deps,
    journal: Journal,
    orders: ComponentOrders,
    record: MigrationRecord,
    disk: DiskPlan,
    live_round: figures.Round,
) -> tuple[MigrationRecord, PassResult | None]:
    """One pass on one disk, its figures shown while it runs; the next number and the
    progress persisted after it."""
    pass_no = _next_pass(record, disk)
    volume = await _volume(deps, disk)
    served = (disk.disk_id, component_disk(disk))
    try:
        async with figures.watching(deps, journal, record, live_round, served, pass_no):
            result = await reconcile_pass(
                orders, _reconcile_disk(journal, record, disk), volume, pass_no
            )
    except ReconcileUnavailable as error:  # the next pass makes up for it
        log.warning("reconcile pass failed for now", error=str(error))
        extra = _extra(record, NEXT_PASS, disk.disk_id, pass_no + 1)
        return await journal.update(record, extra=extra), None
    return await _note_pass(journal, record, disk, result, live_round), result


async def _note_pass(
    journal: Journal,
    record: MigrationRecord,
    disk: DiskPlan,
    result: PassResult,
    live_round: figures.Round,
) -> MigrationRecord:
    live_round.done(disk.disk_id, result)
    record = replace(record, extra=figures.note_pass(record, disk.disk_id, result))
    extra = _extra(record, NEXT_PASS, disk.disk_id, result.pass_no + 1)
    log.info(
        "reconcile pass",
        migration_id=record.migration_id,
        disk_id=disk.disk_id,
        pass_no=result.pass_no,
        bytes=result.bytes,
        remainder=result.remainder_bytes,
    )
    return await journal.update(record, extra=extra, **live_round.figures().changes())


# -- CUTTING_OVER --------------------------------------------------------------------------


async def cut_over(deps: Deps, journal: Journal, record: MigrationRecord) -> MigrationRecord:
    """Off, the last pass and the check, the disks swapped to the volumes, on."""
    cloud = deps.site(record.target_site)
    vm_id = record.cloud_vm_id or record.migration_id
    started = deps.clock.monotonic()
    if not record.extra.get(SWAPPED):
        vm = await cloud.get_vm(vm_id)
        if vm.power_state is not PowerState.OFF:
            await cloud.set_power(vm_id, PowerState.OFF)
        await _gate(deps, record, ASK_OFF)
        orders = _orders(deps)
        extra, last_round = figures.begin_round(record)
        record = await journal.update(record, extra=extra, **last_round.figures().changes())
        for disk in record.disks:
            record = await _last_pass(deps, journal, orders, record, disk, last_round)
        for disk in record.disks:
            await deps.cloud.unexport(disk.volume_id)
        await cloud.replace_disks(vm_id, tuple(_on_volume(d) for d in record.disks))
        done = figures.finished(record).changes()
        record = await journal.update(record, extra={**record.extra, SWAPPED: True}, **done)
    vm = await cloud.get_vm(vm_id)
    if vm.power_state is not PowerState.ON:
        await cloud.set_power(vm_id, PowerState.ON)
    if CUTOVER_SECONDS not in record.extra:
        seconds = round(deps.clock.monotonic() - started, 3)
        record = await journal.update(record, extra={**record.extra, CUTOVER_SECONDS: seconds})
        log.info("cut over", migration_id=record.migration_id, seconds=seconds)
    return record


async def _last_pass(
    deps: Deps,
    journal: Journal,
    orders: ComponentOrders,
    record: MigrationRecord,
    disk: DiskPlan,
    last_round: figures.Round,
) -> MigrationRecord:
    asked = (record.extra.get(CUTOVER_PASS) or {}).get(disk.disk_id)
    if asked is None:
        asked = _next_pass(record, disk)
        record = await journal.update(
            record, extra=_extra(record, CUTOVER_PASS, disk.disk_id, asked)
        )
    if disk.cache_address is None:
        raise ComponentError(f"{disk.disk_id}: the cache does not serve it")
    served = (disk.disk_id, component_disk(disk))
    async with figures.watching(deps, journal, record, last_round, served, int(asked)):
        done = await cutover_pass(
            orders,
            _reconcile_disk(journal, record, disk),
            await _volume(deps, disk),
            int(asked),
            cache=parse_address(disk.cache_address),
            image=image_export(component_disk(disk)),
        )
    log.info(
        "cutover pass",
        migration_id=record.migration_id,
        disk_id=disk.disk_id,
        bytes=done.last.bytes,
        digest=done.check.left_digest.hex(),
    )
    checked = replace(disk, target_digest=done.check.right_digest.hex())
    last_round.done(disk.disk_id, done.last)
    record = replace(
        record.with_disk(checked), extra=figures.note_pass(record, disk.disk_id, done.last)
    )
    extra = _extra(record, NEXT_PASS, disk.disk_id, int(asked) + 1)
    return await journal.update(
        record, disks=record.disks, extra=extra, **last_round.figures().changes()
    )


def _on_volume(disk: DiskPlan) -> DiskConfig:
    return DiskConfig(
        disk.disk_id, disk.label, disk.capacity_bytes, disk.boot, volume_id=disk.volume_id
    )


# -- CUT_OVER, COMMITTING ------------------------------------------------------------------


async def may_go_warm(deps: Deps, records: dict[str, MigrationRecord]) -> bool:
    """A resting tbc group asked to commit leaves its rest for the bulk copy only when its
    cache node has an in-progress slot for every member; else it rests and asks again."""
    for record in records.values():
        if not await may_leave_rest(deps.policies, deps.migrations, record):
            log.info("commit waits for a slot on its cache node", migration_id=record.migration_id)
            return False
    return True


async def go_warm(deps: Deps, journal: Journal, records: dict[str, MigrationRecord]) -> None:
    """A committed tbc group goes on as warm from its rest: each member, in one write, a
    warm migration at BULK_COPYING (the commit it was asked stays: once cut over, it
    commits without another request)."""
    for migration_id, record in list(records.items()):
        if record.migration_type is MigrationType.TBC and record.step is Step.RUNNING_IN_CLOUD:
            warm = replace(record, migration_type=MigrationType.WARM)
            records[migration_id] = await journal.advance(warm, Step.BULK_COPYING)
            log.info("committed tbc goes on as warm", migration_id=migration_id)


async def until_commit(deps: Deps, records: dict[str, MigrationRecord]) -> None:
    """Rest on the volumes until a CommitRequest asked every member to commit."""
    while True:
        asked = [ASK_COMMIT in await deps.migrations.asks(m) for m in records]
        if all(asked):
            return
        await deps.clock.sleep(deps.config.resting_poll_s)


async def commit(deps: Deps, journal: Journal, record: MigrationRecord) -> MigrationRecord:
    """The cache disks and the migrate-time snapshot go (as HDM cleans up); idempotent."""
    served = ServedDisks(deps, journal.lease)
    for disk in record.disks:  # cut over: the volume, checked whole, holds the disk
        await served.close_cache(record, disk, Discard.ALWAYS)
        await served.close_onprem(record, disk)
    await holds.hold(deps, record, holds.COMMIT)
    onprem = deps.site(record.site)
    if record.snapshot_name is not None:
        await onprem.delete_vm_snapshot(record.vm_id, record.snapshot_name)
    for disk in record.disks:
        await journal.checkpoints(transfer_id(record, disk.disk_id)).delete()
    vm = await onprem.get_vm(record.vm_id)
    if tags.pending_migration(vm) == record.migration_id:
        await onprem.tag_vm(record.vm_id, tags.cleared())
    await onprem.release(record.vm_id)
    await deps.site(record.target_site).release(record.cloud_vm_id or record.migration_id)
    log.info("committed", migration_id=record.migration_id)
    return record
