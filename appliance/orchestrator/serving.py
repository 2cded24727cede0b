"""Orders to the components that serve a VM's disks while it runs in the cloud (tbc).

The on-prem I/O manager opens the VM's lab disk at its migrate-time snapshot
and serves its current image; the cloud cache opens a read-write export on
top of it, which the cloud VM runs on. Every order carries the group lease's
fencing token (``ComponentOrders`` refuses to give one when the lease is not
held). A disk's id on the components is ``<migration>-<disk>`` (``DiskPlan.component_id``):
unique per migration, so a second migration of a VM never meets the first one's cache disk.

Epochs: a ``cut_epoch`` order with the disk's counter one higher cuts one; the
on-prem heartbeat's ``committed_epoch`` says when it is on-prem.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from appliance.components.cache.cache import Discard
from appliance.components.control import ComponentOrders
from appliance.components.heartbeat import ComponentHealth, ComponentReport
from appliance.components.orders import ComponentId, Order, OrderAction, OrderOutcome, OutcomeKind
from appliance.errors import ComponentError, ComponentSilent, TransientError
from appliance.orchestrator.context import Deps
from appliance.orchestrator.record import DiskPlan, MigrationRecord
from appliance.state.leases import Lease


@dataclass(frozen=True, slots=True)
class Opened:
    address: str
    export: str


def component_disk(disk: DiskPlan) -> str:
    return disk.served_as


class ServedDisks:
    """One group run's orders to the cache and the I/O manager, fenced by its lease."""

    def __init__(self, deps: Deps, lease: Lease) -> None:
        config = deps.config
        self._deps = deps
        self._lease = lease
        self._onprem = ComponentOrders(deps.store, ComponentId.parse(config.onprem_component))
        self._cache = ComponentOrders(deps.store, ComponentId.parse(config.cache_component))
        self._health = ComponentHealth(deps.store, config.component_timeout_s)

    @property
    def onprem(self) -> ComponentId:
        return self._onprem.instance

    def _order(
        self,
        record: MigrationRecord,
        disk: DiskPlan,
        action: OrderAction,
        epoch_request: int = 0,
        params: Mapping[str, str | int] | None = None,
    ) -> Order:
        return Order(
            component_disk(disk),
            action,
            record.migration_id,
            self._lease.token,
            self._lease.resource,
            epoch_request,
            params=dict(params or {}),
        )

    async def _applied(self, orders: ComponentOrders, order: Order) -> OrderOutcome:
        outcome = await orders.give_and_wait(order, self._deps.config.component_order_timeout_s)
        if outcome.kind is OutcomeKind.APPLIED:
            return outcome
        reason = f"{order.action.value} {outcome.kind.value} ({outcome.code.value}): "
        if outcome.retryable:
            raise ComponentSilent(str(orders.instance), order.disk_id, order.order_id, 0.0)
        raise ComponentError(f"{orders.instance}: {reason}{outcome.reason}")

    async def open_onprem(self, record: MigrationRecord, disk: DiskPlan, location: str) -> str:
        """The I/O manager serves the disk; the HOST:PORT of its NBD server."""
        if disk.snapshot_id is None:
            raise ComponentError(f"{self.onprem}: {disk.disk_id} has no migrate-time snapshot")
        params = {"disk_dir": location, "snapshot_id": disk.snapshot_id}
        order = self._order(record, disk, OrderAction.OPEN, params=params)
        outcome = await self._applied(self._onprem, order)
        return str(outcome.result["address"])

    async def open_cache(self, record: MigrationRecord, disk: DiskPlan, upstream: str) -> Opened:
        """The cache serves the disk to the cloud VM, reading through from ``upstream``."""
        params: dict[str, str | int] = {
            "size": disk.capacity_bytes,
            "upstream": upstream,
            "onprem": self.onprem.name,
        }
        order = self._order(record, disk, OrderAction.OPEN, params=params)
        outcome = await self._applied(self._cache, order)
        return Opened(str(outcome.result["address"]), str(outcome.result["export"]))

    async def cut(self, record: MigrationRecord, disk: DiskPlan, request: int) -> int:
        """Cut epoch number ``request`` asks for (the same counter again: the same epoch)."""
        order = self._order(record, disk, OrderAction.CUT_EPOCH, epoch_request=request)
        outcome = await self._applied(self._cache, order)
        return int(str(outcome.result["epoch"]))

    async def close_cache(
        self, record: MigrationRecord, disk: DiskPlan, discard: Discard = Discard.KEEP
    ) -> None:
        """Stop serving; ``discard``: also remove the disk's cache files (when its data is
        safe on-prem, or in a verified volume)."""
        params: dict[str, str | int] = {}
        if discard is not Discard.KEEP:
            params["discard"] = discard.value
        order = self._order(record, disk, OrderAction.CLOSE, params=params)
        await self._applied(self._cache, order)

    async def close_onprem(self, record: MigrationRecord, disk: DiskPlan) -> None:
        await self._applied(self._onprem, self._order(record, disk, OrderAction.CLOSE))

    async def committed(self, disks: list[DiskPlan]) -> dict[str, int]:
        """The epoch committed on-prem per disk (plan disk id), as the last heartbeat says."""
        report = await self._health.report(self.onprem)
        return _committed(report, disks)

    async def wait_committed(self, disks: list[tuple[DiskPlan, int]], within_s: float) -> None:
        """Until every disk's epoch is committed on-prem (woken by heartbeats)."""

        def done(report: ComponentReport) -> bool:
            found = _committed(report, [d for d, _ in disks])
            return all(found.get(d.disk_id, 0) >= epoch for d, epoch in disks)

        try:
            await self._health.wait_until(self.onprem, done, within_s)
        except TimeoutError:
            names = ", ".join(f"{d.disk_id}@{epoch}" for d, epoch in disks)
            raise EpochNotCommitted(str(self.onprem), names, within_s) from None


class EpochNotCommitted(TransientError):
    def __init__(self, instance: str, disks: str, within_s: float) -> None:
        self.instance = instance
        self.disks = disks
        self.within_s = within_s
        super().__init__(f"{instance} did not commit {disks} within {within_s:g} s")


def _committed(report: ComponentReport, disks: list[DiskPlan]) -> dict[str, int]:
    figures = report.figures.get("committed_epoch", {})
    if not isinstance(figures, Mapping):
        return {}
    return {d.disk_id: int(figures.get(component_disk(d), 0)) for d in disks}
