"""Recovery: the VMs that depend on a lost component go back on-prem to their last committed
epoch (DESIGN.md §6 "failure").

A component is *lost* when it stayed failed past the recovery deadline (it could not be
repaired in time) or its data is gone (a cache restarted without the data directory
that held the disk's dirty data: its outcome says ``data_lost``). The service's trigger
(appliance/service/recovery.py) then asks every member of each dependent group
(``ask:recover``, the component and why); only migrations at a step of their machine's
``recover_from`` depend on it (tbc from OPENING_DISKS to the planned way back's
BACK_REMOVING_CLOUD, warm until its cutover: a warm VM cut over runs on its volumes).

The group's run, seeing the ask, ends at once; the next run takes the group's lease with
a *new* fencing token and goes down the recovery path, every member through each step:

* RECOVERY_FENCING: the I/O manager closes each disk with the new token, so on-prem now
  refuses anything the old owner's cache still sends (an epoch commit with the old token
  is ``stale_token``); its close outcome says what the disk's journal holds (applied
  epoch, committed prefix: nothing half-applied). A cache that is alive (restarted
  without its data) closes and discards the disks; one that is silent (killed, paused)
  is given no order: if it ever resumes, its commits are refused on-prem. When the lost
  component is the I/O manager itself, nothing can vouch for the image.
* RECOVERY_REMOVING_CLOUD: the cloud VM is powered off and removed (a warm VM's
  half-made volumes too).
* RECOVERY_CHECKING_DISKS: the verdict. The on-prem image is the last committed epoch when
  every disk's journal is whole, shows no epoch committed but not applied, and has
  applied at least what the appliance saw committed: pool ``_HDM_RECOVERYSUCCESS``, else
  ``_HDM_RECOVERYFAILED`` with the migrate-time snapshot kept for a restore.
* RECOVERY_RETURNING: the on-prem VM, powered off, moves to that pool.

Then RECOVERED or RECOVERY_FAILED, with an event (kinds in :class:`RecoveryEvent`) and
the status's ``recovery`` (component, reason, pool, verdict).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from appliance.components.cache.cache import Discard
from appliance.components.control import ComponentOrders
from appliance.components.heartbeat import ComponentHealth, Liveness
from appliance.components.orders import (
    ComponentId,
    ComponentKind,
    Order,
    OrderAction,
    OutcomeKind,
)
from appliance.errors import ComponentSilent, FerryError
from appliance.logs import get_logger
from appliance.orchestrator import tags
from appliance.orchestrator.context import Deps
from appliance.orchestrator.journal import Journal
from appliance.orchestrator.limits import cache_node_of
from appliance.orchestrator.record import DiskPlan, MigrationRecord
from appliance.orchestrator.serving import component_disk
from appliance.orchestrator.states import RECOVERY, Step, machine_for
from appliance.orchestrator.steps import transfer_id
from messages.common import PowerState

log = get_logger(__name__)

ASK_RECOVER = "recover"
"""``ask:recover`` on a migration: a component it depends on is lost (JSON: :class:`Lost`)."""
VERDICTS = "recovery_disks"
"""``extra``: per disk, what the I/O manager's close said of its journal."""
COMPONENT_LOST = "component_lost"
"""The error code of a migration sent back by a recovery."""


class RecoveryEvent(StrEnum):
    """The event kinds of recovery, as written to the event log (global and per migration)."""

    RECOVERY_STARTED = "recovery_started"
    """The trigger: ``component``, ``reason``, the ``migrations`` it sends back."""
    MIGRATION_RECOVERED = "migration_recovered"
    """A VM back at its last committed epoch: ``pool``, ``reason``, ``verdict``."""
    MIGRATION_RECOVERY_FAILED = "migration_recovery_failed"
    """A VM back, its image not proven a committed prefix: restore from ``snapshot``."""


@dataclass(frozen=True, slots=True)
class Lost:
    """A lost component and why it counts as lost."""

    component: str
    reason: str

    def encode(self) -> str:
        return json.dumps({"component": self.component, "reason": self.reason})

    @classmethod
    def decode(cls, raw: str) -> Lost:
        try:
            found = json.loads(raw)
            return cls(str(found["component"]), str(found["reason"]))
        except (ValueError, KeyError, TypeError):
            return cls("unknown", raw[:500])


def depends_on(record: MigrationRecord, instance: ComponentId, onprem: str) -> bool:
    """Does this migration, at its step, need ``instance`` (its cache node, or the I/O
    manager ``onprem``) to keep its VM's data?"""
    if record.step not in machine_for(record.migration_type).recover_from:
        return False
    if instance.kind == ComponentKind.CACHE.value:
        return cache_node_of(record) == instance.name
    return str(instance) == onprem


def recovering(record: MigrationRecord) -> bool:
    return record.step in RECOVERY


async def asked(deps: Deps, records: Mapping[str, MigrationRecord]) -> Lost | None:
    """The lost component if a recovery was asked of a member that depends on it now, or
    one is under way (a run cut short picks it up again)."""
    for migration_id, record in records.items():
        if recovering(record) and record.recovery_component is not None:
            return Lost(record.recovery_component, record.recovery_reason or "")
        if record.step not in machine_for(record.migration_type).recover_from:
            continue
        raw = (await deps.migrations.asks(migration_id)).get(ASK_RECOVER)
        if raw is not None:
            return Lost.decode(raw)
    return None


class Recovery:
    """One group's way back to its last committed epochs (the run holds a fresh token)."""

    def __init__(
        self, deps: Deps, journal: Journal, records: dict[str, MigrationRecord], lost: Lost
    ) -> None:
        self._deps = deps
        self._journal = journal
        self._records = records  # the run's own: updated in place
        self._lost = lost
        self._log = log.bind(component=lost.component)

    def _members(self) -> list[str]:
        return [
            migration_id
            for migration_id, record in self._records.items()
            if recovering(record) or record.step in machine_for(record.migration_type).recover_from
        ]

    async def run(self) -> None:
        members = self._members()
        self._log.warning("recovery: going back to the last committed epoch", members=members)
        for step in RECOVERY:
            for migration_id in members:
                record = self._records[migration_id]
                if _position(record.step) < RECOVERY.index(step):
                    record = await self._enter(record, step)
                if record.step is step:
                    self._records[migration_id] = await self._act(record)
        for migration_id in members:
            await self._finish(self._records[migration_id])

    async def _enter(self, record: MigrationRecord, step: Step) -> MigrationRecord:
        changes: dict[str, Any] = {}
        if step is RECOVERY[0]:
            changes = {
                "recovery_component": self._lost.component,
                "recovery_reason": self._lost.reason,
                "error_code": COMPONENT_LOST,
                "error_message": f"{self._lost.component} lost: {self._lost.reason}"[:4096],
            }
        updated = await self._journal.advance(record, step, **changes)
        self._records[record.migration_id] = updated
        self._log.info("recovery step", migration_id=record.migration_id, step=step.value)
        return updated

    async def _act(self, record: MigrationRecord) -> MigrationRecord:
        if record.step is Step.RECOVERY_FENCING:
            return await self._fence(record)
        if record.step is Step.RECOVERY_REMOVING_CLOUD:
            return await self._remove_cloud(record)
        if record.step is Step.RECOVERY_CHECKING_DISKS:
            return await self._check(record)
        return await self._return(record)

    # -- the steps ---------------------------------------------------------------------------

    def _order(
        self, record: MigrationRecord, disk: DiskPlan, action: OrderAction, **params: str
    ) -> Order:
        lease = self._journal.lease
        return Order(
            component_disk(disk),
            action,
            record.migration_id,
            lease.token,
            lease.resource,
            params=dict(params),
        )

    async def _fence(self, record: MigrationRecord) -> MigrationRecord:
        """On-prem takes the new token first: the old owner's cache can commit nothing more."""
        config = self._deps.config
        onprem_id = ComponentId.parse(config.onprem_component)
        onprem = ComponentOrders(self._deps.store, onprem_id)
        # The I/O manager itself lost and silent: its close is given (carried out if it
        # comes back) and nothing vouches for the image.
        silent = self._lost.component == str(onprem_id) and not await self._alive(onprem_id)
        verdicts: dict[str, dict[str, Any]] = dict(record.extra.get(VERDICTS, {}))
        for disk in record.disks:
            order = self._order(record, disk, OrderAction.CLOSE)
            if silent:
                await onprem.give(order)
                verdicts[disk.disk_id] = {"journal": "unreachable", "committed_prefix": False}
                continue
            outcome = await onprem.give_and_wait(order, config.component_order_timeout_s)
            if outcome.kind is OutcomeKind.APPLIED:
                verdicts[disk.disk_id] = dict(outcome.result)
            else:
                reason = f"close {outcome.kind.value} ({outcome.code.value}): {outcome.reason}"
                verdicts[disk.disk_id] = {"journal": "unknown", "reason": reason}
        record = await self._journal.update(record, extra={**record.extra, VERDICTS: verdicts})
        await self._close_cache(record)
        return record

    async def _alive(self, instance: ComponentId) -> bool:
        timeout_s = self._deps.config.component_timeout_s
        report = await ComponentHealth(self._deps.store, timeout_s).report(instance)
        return report.liveness is Liveness.OK

    async def _close_cache(self, record: MigrationRecord) -> None:
        """A cache that is alive drops the disks (discards them when it is the one lost: what
        it holds is untrusted or empty); a silent one is given nothing."""
        config = self._deps.config
        instance = ComponentId.parse(config.cache_component)
        if not await self._alive(instance):
            self._log.warning(
                "cache silent: its disks are not closed (a resumed cache is refused on-prem)",
                migration_id=record.migration_id,
            )
            return
        discard = Discard.ALWAYS if self._lost.component == str(instance) else Discard.KEEP
        orders = ComponentOrders(self._deps.store, instance)
        for disk in record.disks:
            params = {"discard": discard.value} if discard is not Discard.KEEP else {}
            order = self._order(record, disk, OrderAction.CLOSE, **params)
            try:
                outcome = await orders.give_and_wait(order, config.component_order_timeout_s)
            except (ComponentSilent, FerryError) as error:
                self._log.warning("cache disk not closed", disk=order.disk_id, error=str(error))
                continue
            if outcome.kind is not OutcomeKind.APPLIED:
                self._log.warning("cache disk not closed", disk=order.disk_id, why=outcome.reason)

    async def _remove_cloud(self, record: MigrationRecord) -> MigrationRecord:
        cloud = self._deps.site(record.target_site)
        vm_id = record.cloud_vm_id or record.migration_id
        with contextlib.suppress(FerryError):
            vm = await cloud.get_vm(vm_id)
            if vm.power_state is not PowerState.OFF:
                await cloud.set_power(vm_id, PowerState.OFF)
        await cloud.delete_vm(vm_id)
        for disk in record.disks:  # a warm VM's volumes, half made: nothing of them is kept
            await self._deps.cloud.unexport(disk.volume_id)
            await cloud.delete_volume(disk.volume_id)
            await self._journal.checkpoints(transfer_id(record, disk.disk_id)).delete()
        await self._journal.delete_secret(record)
        return record

    async def _check(self, record: MigrationRecord) -> MigrationRecord:
        verdicts = record.extra.get(VERDICTS, {})
        problems: list[str] = []
        lines: list[str] = []
        for disk in record.disks:
            found = verdicts.get(disk.disk_id, {})
            problem = disk_problem(disk, found)
            lines.append(f"{disk.disk_id}: {problem or _said(found)}")
            if problem is not None:
                problems.append(problem)
        config = self._deps.config
        pool = config.recovery_failed_pool if problems else config.recovery_success_pool
        return await self._journal.update(
            record, recovery_pool=pool, recovery_verdict="; ".join(lines)[:4096]
        )

    async def _return(self, record: MigrationRecord) -> MigrationRecord:
        onprem = self._deps.site(record.site)
        pool = record.recovery_pool or self._deps.config.recovery_failed_pool
        vm = await onprem.get_vm(record.vm_id)
        if vm.power_state is not PowerState.OFF:
            await onprem.set_power(record.vm_id, PowerState.OFF)
        if vm.resource_pool != pool:
            await onprem.move_to_pool(record.vm_id, pool)
        kept = pool != self._deps.config.recovery_success_pool or record.keep_snapshot
        if record.snapshot_name is not None and not kept:
            await onprem.delete_vm_snapshot(record.vm_id, record.snapshot_name)
        if tags.pending_migration(vm) == record.migration_id:
            await onprem.tag_vm(record.vm_id, tags.cleared())
        await onprem.release(record.vm_id)
        await self._journal.unlock_vm(record)
        return record

    async def _finish(self, record: MigrationRecord) -> None:
        if record.step is not Step.RECOVERY_RETURNING:
            return  # already over
        success = record.recovery_pool == self._deps.config.recovery_success_pool
        if success:
            step, kind = Step.RECOVERED, RecoveryEvent.MIGRATION_RECOVERED
            message = (
                f"{self._lost.component} lost ({self._lost.reason}): back on-prem at its last "
                f"committed epoch, in {record.recovery_pool}"
            )
        else:
            step, kind = Step.RECOVERY_FAILED, RecoveryEvent.MIGRATION_RECOVERY_FAILED
            message = (
                f"{self._lost.component} lost ({self._lost.reason}): back on-prem in "
                f"{record.recovery_pool}, its image not proven a committed prefix "
                f"({record.recovery_verdict}); restore it from snapshot {record.snapshot_name}"
            )
        done = await self._journal.advance(record, step, error_message=message[:4096])
        self._records[record.migration_id] = done
        await self._deps.events.append(
            kind.value,
            self._journal.now(),
            record.migration_id,
            component=self._lost.component,
            reason=self._lost.reason,
            pool=record.recovery_pool or "",
            verdict=record.recovery_verdict,
            snapshot=record.snapshot_name or "",
        )
        self._log.warning(
            "recovered" if success else "recovery failed",
            migration_id=record.migration_id,
            pool=record.recovery_pool,
            verdict=record.recovery_verdict,
        )


def disk_problem(disk: DiskPlan, found: Mapping[str, Any]) -> str | None:
    """Why this disk's on-prem image is not proven the last committed epoch (None: it is)."""
    journal = found.get("journal")
    if journal == "absent":
        if disk.onprem_address is None:
            return None  # never served on-prem: its image is the snapshot, untouched
        return "its journal is gone (the I/O manager's data was lost)"
    if journal != "ok":
        return f"the journal cannot say ({journal}: {found.get('reason', '')})"
    if not found.get("committed_prefix"):
        return "an epoch is committed but not applied (half-applied, its staging lost)"
    applied = int(found.get("applied_epoch", 0))
    if applied < disk.epoch_committed:
        return f"the journal shows epoch {applied} applied, {disk.epoch_committed} was committed"
    return None


def _said(found: Mapping[str, Any]) -> str:
    return f"committed prefix, epoch {found.get('applied_epoch', 0)} applied"


def _position(step: Step) -> int:
    return RECOVERY.index(step) if step in RECOVERY else -1
