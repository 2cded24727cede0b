"""A reset brings home every VM the components serve: to its last committed epoch, no more.

A reset is what an operator does when things are wrong, so it cuts no final epoch and
trusts no component to take part: whatever the cache holds beyond the last epoch the
I/O manager committed is dropped. Runs are stopped first, and this process starts none
until the reset is over (the scheduler is held: otherwise it resumes a group stopped by
the reset before the reset takes its lease); then, for each group, under
the group's lease taken by the reset (a fencing token newer than any run's, and an owner
of its own, so no scheduler resumes the group meanwhile), each unfinished migration
whose disks the components may serve is handled by what it had reached:

* **not yet running in the cloud** (a step a failure would roll back, or rolling back):
  the cache and the I/O manager let go of its disks; the rest is the undo of
  ``leftovers`` (cloud VM and volumes removed, the source as it was, from its tags);
* **running in the cloud** (tbc resting or migrating back, warm before its disks were
  swapped to the volumes): **returned**: the cloud VM is powered off and removed, the
  migration's cloud volumes too; the cache closes each disk and discards its files
  (``discard: always``: the dirty data since the last epoch is dropped on purpose); the
  I/O manager closes each disk, whose image is its current one (snapshot + every
  committed epoch) and says at which epoch (the close outcome's ``epoch``); the on-prem
  VM stays powered off in the migrate pool (``_HDM_MIGRATEPOOL``) with its migrate-time
  snapshot kept, so an operator can restore it; its tags go, so nothing treats it as a
  leftover again and it may be migrated anew;
* **cut over** (warm, its cloud VM running on its volumes): **kept in the cloud**, as a
  commit would finish it: the cache and the I/O manager let go of its disks (the volume,
  checked whole at the cut-over, holds the data), the migrate-time snapshot goes, the
  source stays powered off in the migrate pool, its tags go.

The records are forgotten afterwards (``dispatch.admin``). What "component state
removed" means, precisely:

* per disk of these migrations, on each component that is up: a ``close`` order carried
  out (the cache removes the disk's files; the I/O manager removes its exports and hands
  the disk back, keeping only its per-disk token and epoch journal in its data directory:
  the fence against an old owner's late order and the record of what was committed);
* in Redis: every order, outcome and notification key of both components (they describe
  only migrations that no longer exist), except the orders of a component that is down;
  its heartbeat keys stay (each beat rewrites them; removing them would read as a failure);
* a component that is **down** (its heartbeat silent past the timeout, or no outcome within
  the order timeout): its close orders stay in Redis as its desired state, so it closes
  and discards those disks itself when it comes back (orders are reconciled on start);
  the reset does not wait for it. With the cache down, nothing is lost that a reset keeps
  (the site-side steps and the I/O manager's close need no cache). With the I/O manager
  down, the disk cannot be handed back yet (an epoch may be half applied until its journal
  is replayed): the VM is parked, powered off, and reported with an error saying so.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from appliance.components.cache.cache import Discard
from appliance.components.control import ComponentOrders
from appliance.components.heartbeat import ComponentHealth, Liveness
from appliance.components.orders import (
    ComponentId,
    ComponentKeys,
    Order,
    OrderAction,
    OutcomeKind,
)
from appliance.errors import ComponentSilent, FerryError, OrderRefused, UnknownVm
from appliance.logs import get_logger
from appliance.orchestrator import tags
from appliance.orchestrator.context import Deps
from appliance.orchestrator.record import DiskPlan, MigrationRecord, load
from appliance.orchestrator.scheduler import group_lease
from appliance.orchestrator.serving import component_disk
from appliance.orchestrator.states import TERMINAL, Step, machine_for
from appliance.orchestrator.warm import SWAPPED
from appliance.state.keys import Keys
from appliance.state.leases import Lease, LeaseKeeper, Leases
from messages.common import PowerState

log = get_logger(__name__)
TAKE_ATTEMPTS = 5
"""Times the reset asks again for a group's lease held by this process's own run (stopped)."""
_BEFORE_COMPONENTS = frozenset({Step.QUEUED, Step.PREPARING, Step.POWERING_OFF, Step.SNAPSHOTTING})
_CUT_OVER = frozenset({Step.CUT_OVER, Step.COMMITTING})


class Handling(StrEnum):
    """What a reset does with a migration the components serve."""

    ROLLBACK = "rollback"  # not yet in the cloud: undone, the source as it was
    RETURNED = "returned"  # home to its last committed epoch, in the migrate pool
    KEPT_IN_CLOUD = "kept_in_cloud"  # cut over: the cloud copy stays, finished


ROLLBACK, RETURNED, KEPT_IN_CLOUD = Handling.ROLLBACK, Handling.RETURNED, Handling.KEPT_IN_CLOUD


@dataclass
class Returned:
    """What the reset did about one migration the components served."""

    migration_id: str
    vm_id: str
    how: Handling
    actions: list[str] = field(default_factory=list)
    epoch: int | None = None
    error: str | None = None
    vm_name: str = ""


def served(record: MigrationRecord) -> bool:
    """May the components hold this migration's disks (it reached OPENING_DISKS)?"""
    machine = machine_for(record.migration_type)
    return (
        Step.OPENING_DISKS in machine.steps
        and record.step not in _BEFORE_COMPONENTS
        and record.step not in TERMINAL
    )


def how_handled(record: MigrationRecord) -> Handling:
    machine = machine_for(record.migration_type)
    if record.step is Step.ROLLING_BACK or machine.rolls_back(record.step):
        return ROLLBACK
    if record.step in _CUT_OVER or (record.step is Step.CUTTING_OVER and record.extra.get(SWAPPED)):
        return KEPT_IN_CLOUD
    return RETURNED


@dataclass(frozen=True, slots=True)
class _Components:
    """Which components answered orders at the start of the reset."""

    cache: ComponentOrders
    onprem: ComponentOrders
    down: frozenset[str]

    def is_down(self, orders: ComponentOrders) -> bool:
        return str(orders.instance) in self.down


class ReturnHome:
    """The reset's part for the VMs the components serve (see the module docstring)."""

    def __init__(self, deps: Deps, stop_runs: Callable[[], Awaitable[None]]) -> None:
        self._deps = deps
        self._stop_runs = stop_runs
        base = deps.leases
        self._leases = Leases(deps.store, f"{base.owner}/reset", base.ttl_s)
        self.down: set[str] = set()
        """Components found down (heartbeat silent, or no outcome in time)."""

    async def run(self, unfinished: Sequence[MigrationRecord]) -> list[Returned]:
        chosen = [r for r in unfinished if served(r)]
        if not chosen:
            return []
        components = await self._components()
        self.down |= components.down
        groups: dict[str, list[MigrationRecord]] = {}
        for record in chosen:
            groups.setdefault(record.group_id, []).append(record)
        results: list[Returned] = []
        for group_id, members in groups.items():
            results += await self._group(group_id, members, components)
        for item in results:
            log.warning(
                "reset: a VM on the components handled",
                migration_id=item.migration_id,
                how=item.how,
                epoch=item.epoch,
                actions=item.actions,
                error=item.error,
            )
        return results

    async def _components(self) -> _Components:
        config = self._deps.config
        health = ComponentHealth(self._deps.store, config.component_timeout_s)
        cache = ComponentOrders(self._deps.store, ComponentId.parse(config.cache_component))
        onprem = ComponentOrders(self._deps.store, ComponentId.parse(config.onprem_component))
        down = set()
        for orders in (cache, onprem):
            report = await health.report(orders.instance)
            if report.liveness is Liveness.FAILED:
                down.add(str(orders.instance))
        return _Components(cache, onprem, frozenset(down))

    async def _group(
        self, group_id: str, members: list[MigrationRecord], components: _Components
    ) -> list[Returned]:
        lease = await self._take(group_lease(group_id))
        if lease is None:
            holder = await self._leases.holder(group_lease(group_id))
            why = f"its group is driven by another appliance ({holder}): reset that one too"
            return [
                Returned(r.migration_id, r.vm_id, how_handled(r), error=why, vm_name=r.vm_name)
                for r in members
            ]
        results: list[Returned] = []

        async def work() -> None:
            for record in members:
                results.append(await self._one(lease, record, components))

        await LeaseKeeper(self._leases, lease).run(work)
        # The lease is kept (it lapses by itself, or goes with every key): no run resumes
        # the group before its records are forgotten.
        return results

    async def _take(self, resource: str) -> Lease | None:
        """The group's lease for the reset; None while another appliance holds it.

        The scheduler is held for the whole reset (``ResetCleanup.runs_held``), so no run of
        this process holds it after the first stop; still, a run found holding it is
        stopped and the lease asked again, and a lease let go of between the ask and the
        look at its holder is asked again too (it is nobody's: never "another appliance")."""
        for _ in range(TAKE_ATTEMPTS):
            lease = await self._leases.acquire(resource)
            if lease is not None:
                return lease
            holder = await self._leases.holder(resource)
            if holder is not None and holder != self._deps.leases.owner:
                return None
            if holder is not None:
                await self._stop_runs()
        return await self._leases.acquire(resource)

    async def _one(
        self, lease: Lease, record: MigrationRecord, components: _Components
    ) -> Returned:
        fresh = await self._deps.migrations.get_many([record.migration_id])
        if fresh:
            record = load(fresh[0].record)  # as the stopped run left it
        how = how_handled(record)
        item = Returned(record.migration_id, record.vm_id, how, vm_name=record.vm_name)
        try:
            if item.how == RETURNED:
                await self._remove_cloud_vm(record, item)
                await self._remove_volumes(record, item)
            await self._close(lease, record, components, Discard.ALWAYS, item)
            if item.how != ROLLBACK:
                await self._park(record, item)
        except FerryError as error:
            item.error = f"{type(error).__name__}: {error}"
        return item

    async def _remove_cloud_vm(self, record: MigrationRecord, item: Returned) -> None:
        cloud = self._deps.site(record.target_site)
        vm_id = record.cloud_vm_id or record.migration_id
        try:
            vm = await cloud.get_vm(vm_id)
        except UnknownVm:
            return
        if vm.power_state is not PowerState.OFF:
            await cloud.set_power(vm_id, PowerState.OFF)
            item.actions.append(f"powered off cloud VM {vm_id}")
        await cloud.delete_vm(vm_id)
        item.actions.append(f"deleted cloud VM {vm_id}")

    async def _remove_volumes(self, record: MigrationRecord, item: Returned) -> None:
        """A warm migration's volumes: its bulk copy, never finished (no cut-over)."""
        cloud = self._deps.site(record.target_site)
        for volume in await cloud.list_volumes():
            if volume.tag(tags.MIGRATION) == record.migration_id or volume.volume_id.startswith(
                f"{record.migration_id}-"
            ):
                await self._deps.cloud.unexport(volume.volume_id)
                await cloud.delete_volume(volume.volume_id)
                item.actions.append(f"deleted cloud volume {volume.volume_id}")

    async def _close(
        self,
        lease: Lease,
        record: MigrationRecord,
        components: _Components,
        discard: Discard,
        item: Returned,
    ) -> None:
        """The cache first (it ships no epoch after), then the I/O manager: the epochs."""
        params: dict[str, str | int] = {"discard": discard.value}
        await self._close_on(components.cache, lease, record, params, components, item)
        epochs = await self._close_on(components.onprem, lease, record, {}, components, item)
        if item.how == ROLLBACK:
            return
        if len(epochs) < len(record.disks):
            item.error = (
                f"the on-prem I/O manager {components.onprem.instance} is down: the VM's disks "
                "are handed back when it comes back (it replays its journal, then carries out "
                "the close order left for it); do not power the VM on before"
            )
            return
        item.epoch = min(epochs.values(), default=0)
        for disk_id, epoch in sorted(epochs.items()):
            item.actions.append(f"disk {disk_id} at committed epoch {epoch}")

    async def _close_on(
        self,
        orders: ComponentOrders,
        lease: Lease,
        record: MigrationRecord,
        params: dict[str, str | int],
        components: _Components,
        item: Returned,
    ) -> dict[str, int]:
        """A close order for each disk; the epoch each one was left at, when said."""
        wanted = [
            (disk, Order(component_disk(disk), OrderAction.CLOSE, record.migration_id,
                         lease.token, lease.resource, params=params))
            for disk in record.disks
        ]  # fmt: skip
        for _, order in wanted:
            await orders.give(order)
        if components.is_down(orders) or str(orders.instance) in self.down:
            item.actions.append(f"{orders.instance} is down: its close orders wait for it")
            return {}
        waits = [self._outcome(orders, disk, order, item) for disk, order in wanted]
        found = await asyncio.gather(*waits)
        return {disk.disk_id: epoch for (disk, _), epoch in zip(wanted, found, strict=True)
                if epoch is not None}  # fmt: skip

    async def _outcome(
        self, orders: ComponentOrders, disk: DiskPlan, order: Order, item: Returned
    ) -> int | None:
        timeout = self._deps.config.component_order_timeout_s
        try:
            outcome = await orders.wait(order, timeout)
        except (ComponentSilent, OrderRefused) as error:
            self.down.add(str(orders.instance))
            item.actions.append(f"{orders.instance} did not close {disk.disk_id}: {error}")
            return None
        if outcome.kind is not OutcomeKind.APPLIED:
            item.actions.append(
                f"{orders.instance} did not close {disk.disk_id}: {outcome.kind.value} "
                f"({outcome.code.value}) {outcome.reason}"
            )
            return None
        kind = orders.instance.kind
        item.actions.append(
            f"{orders.instance} closed {disk.disk_id}"
            + (" and discarded its cache" if kind == "cache" else "")
        )
        if "epoch" in outcome.result:
            return int(str(outcome.result["epoch"]))
        return disk.epoch_committed if kind != "cache" else None

    async def _park(self, record: MigrationRecord, item: Returned) -> None:
        """Powered off in the migrate pool; the snapshot kept (returned) or gone (cut over)."""
        onprem = self._deps.site(record.site)
        vm = await onprem.get_vm(record.vm_id)
        if vm.power_state is not PowerState.OFF:
            await onprem.set_power(record.vm_id, PowerState.OFF)
            item.actions.append("powered off the on-prem VM")
        pool = self._deps.config.migrate_pool
        if vm.resource_pool != pool:
            await onprem.move_to_pool(record.vm_id, pool)
        item.actions.append(f"on-prem VM powered off in {pool}")
        if record.snapshot_name is not None:
            if item.how == KEPT_IN_CLOUD:
                await onprem.delete_vm_snapshot(record.vm_id, record.snapshot_name)
                item.actions.append(f"deleted source snapshot {record.snapshot_name}")
                item.actions.append("kept the finished cloud copy running on its volumes")
            else:
                item.actions.append(f"kept source snapshot {record.snapshot_name}")
        if tags.pending_migration(vm) == record.migration_id:
            await onprem.tag_vm(record.vm_id, tags.cleared())  # no leftover of anything now
        await onprem.release(record.vm_id)


def kept_keys(keys: Keys, down: set[str]) -> tuple[frozenset[str], tuple[str, ...]]:
    """What a reset does not remove of the components: every heartbeat (by prefix), and
    the orders of a component that is down (its close orders wait for it)."""
    exact: set[str] = set()
    for name in down:
        component = ComponentKeys(keys, ComponentId.parse(name))
        exact |= {component.orders, component.order_events}
    prefixes = (f"{keys.prefix}:component:", f"{keys.prefix}:component-beats:")
    return frozenset(exact), prefixes
