"""The recovery trigger: when is a component lost, and which migrations does that send back.

Every ``interval_s`` it reads the tbc components' heartbeats and their order outcomes:

* a component failed (silent past ``component_timeout_s``) for longer than the recovery
  deadline (``recovery_after_s``; 0: the component timeout plus
  ``recovery_repair_allowance_s``, the time repair gets) could not be repaired in time:
  every migration that depends on it is lost with it;
* a component whose repair gave up (``HealthBoard.unrepairable``: the repair deadline,
  ``component_repair_timeout_s``, passed) is lost at once, whatever the deadline above;
* the WAN link failed (down past ``wan_down_threshold_s``): once it is back, every cache's
  VMs are lost with it (their on-prem image is as old as the outage; HDM's failure path);
* a cache whose outcome for a disk says ``data_lost`` (restarted without the data directory
  that held the disk's dirty data) has lost that disk: the migrations owning such disks.

Each such migration's whole dependency group is asked to recover (``ask:recover``, with the
component and the reason) and a ``recovery_started`` event names them; the group's run
does the rest (orchestrator/recovery.py). Migrations that do not depend on the component
(cold ones, a warm VM cut over to its volumes, VMs on another cache node) are untouched.

A cache that was silent during a recovery (paused, cut off) is given no order then. When it
lives again and still serves a disk of a migration recovered meanwhile, once it has shown
itself fenced (its shipping refused on-prem for a stale token) or has nothing to ship, the
trigger takes the group's lease (a new token) and orders the disk closed and discarded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from appliance.clock import Clock
from appliance.components.cache.cache import Discard
from appliance.components.control import ComponentOrders
from appliance.components.heartbeat import ComponentHealth as HeartbeatReader
from appliance.components.heartbeat import ComponentReport
from appliance.components.orders import (
    ComponentId,
    ComponentKeys,
    ComponentKind,
    Order,
    OrderAction,
    OrderOutcome,
    OutcomeCode,
)
from appliance.errors import StateStoreUnavailable
from appliance.health import HealthBoard
from appliance.logs import get_logger
from appliance.orchestrator.record import MigrationRecord, load
from appliance.orchestrator.recovery import ASK_RECOVER, Lost, RecoveryEvent, depends_on
from appliance.orchestrator.serving import component_disk
from appliance.orchestrator.states import RECOVERY_ENDS
from appliance.service.health import expected_components, probe_every, tbc_instances
from appliance.settings import Settings
from appliance.state.events import EventLog
from appliance.state.leases import Leases
from appliance.state.migrations import MigrationStore
from appliance.state.store import StateStore, text

log = get_logger(__name__)
WAN_LINK = "wan_link"


def recovery_after_s(settings: Settings) -> float:
    """How long a component may stay failed before the VMs on it are sent back."""
    if settings.recovery_after_s > 0:
        return settings.recovery_after_s
    return settings.component_timeout_s + settings.recovery_repair_allowance_s


@dataclass(frozen=True, slots=True)
class Loss:
    """A lost component: why, and (data lost) which of its disks; None: all of them."""

    instance: ComponentId
    reason: str
    disks: frozenset[str] | None = None


class RecoveryTrigger:
    def __init__(
        self,
        store: StateStore,
        reader: HeartbeatReader,
        instances: Sequence[ComponentId],
        *,
        onprem: str,
        after_s: float,
        interval_s: float,
        clock: Clock,
        board: HealthBoard | None = None,
    ) -> None:
        self._store = store
        self._board = board  # repair's verdicts and the WAN link's state, when given
        self._wan_failed = False
        self._migrations = MigrationStore(store)
        self._events = EventLog(store)
        self._onprem = onprem  # the I/O manager the tbc VMs' disks are on
        self._reader = reader
        self._instances = tuple(instances)
        self._after_s = after_s
        self._interval_s = interval_s
        self._clock = clock
        self._failing_since: dict[ComponentId, float] = {}
        self._leases = Leases(store, "recovery-tidy", ttl_s=30.0)

    async def run(self, stop: asyncio.Event) -> None:
        await probe_every(self._interval_s, self._check, stop)

    async def _check(self) -> None:
        try:
            await self.check()
        except StateStoreUnavailable:
            raise  # the probe loop waits for the state store
        except Exception:  # a defect must not stop the appliance: the next pass tries again
            log.exception("recovery check failed")

    async def check(self) -> list[str]:
        """Ask the groups that depend on a lost component to recover; the migrations asked."""
        losses = [loss for i in self._instances for loss in await self._losses(i)]
        losses += self._wan_losses()
        if not losses:
            return []
        asked: list[str] = []
        for members in await self._groups():
            for loss in losses:
                if any(self._depends(record, loss) for record in members):
                    asked += await self._ask(members, loss)
                    break
        return asked

    async def _losses(self, instance: ComponentId) -> list[Loss]:
        found = []
        report = await self._reader.report(instance)
        if not report.failed:
            self._failing_since.pop(instance, None)
            if instance.kind == ComponentKind.CACHE.value:
                await self._tidy(instance, report)
        else:
            now = self._clock.monotonic()
            # Silent since its last beat; without one (gone past its TTL) since we noticed.
            silent = report.silent_s
            if silent is None:
                since = self._failing_since.setdefault(instance, now - self._reader.timeout_s)
                silent = now - since
            why = self._gave_up(str(instance))
            if why is not None:
                found.append(Loss(instance, f"failed, and its repair gave up: {why}"))
            elif silent > self._after_s:
                reason = (
                    f"failed for {silent:.0f} s ({report.detail}), not repaired within "
                    f"{self._after_s:g} s"
                )
                found.append(Loss(instance, reason))
        lost = await self._data_lost(instance)
        if lost:
            found.append(Loss(instance, lost[1], frozenset(lost[0])))
        return found

    def _gave_up(self, name: str) -> str | None:
        """Why the component's repair gave up; None if it did not (or no board knows)."""
        board = self._board
        if board is None or name not in board.names() or not board.unrepairable(name):
            return None
        return board.unrepairable_reason(name)

    def _wan_losses(self) -> list[Loss]:
        """The WAN link failed (past its threshold) and is back: every cache's VMs."""
        board = self._board
        if board is None or WAN_LINK not in board.names():
            return []
        if board.failed_since(WAN_LINK) is not None:
            self._wan_failed = True
            return []
        if not (self._wan_failed and board.is_ok(WAN_LINK)):
            return []
        self._wan_failed = False
        reason = "the WAN link was down past its threshold: the on-prem image is behind"
        caches = [i for i in self._instances if i.kind == ComponentKind.CACHE.value]
        return [Loss(instance, reason) for instance in caches]

    async def _tidy(self, instance: ComponentId, report: ComponentReport) -> None:
        """Close and discard the disks a live cache still serves for recovered migrations,
        once it is fenced (shipping refused) or has nothing in flight for them."""
        figures = report.figures
        exports = figures.get("exports") or []
        refused = figures.get("shipping_refused") or {}
        in_flight = figures.get("epochs_in_flight") or {}
        if not exports:
            return
        orders = ComponentOrders(self._store, instance)
        for disk in exports:
            if disk not in refused and in_flight.get(disk):
                continue  # its shipper will meet the new token on-prem first
            desired = await orders.desired(disk)
            if desired is None or desired.action is OrderAction.CLOSE:
                continue
            stored = await self._migrations.get(desired.migration_id)
            if stored is None or load(stored.record).step not in RECOVERY_ENDS:
                continue
            await self._close(orders, desired)

    async def _close(self, orders: ComponentOrders, desired: Order) -> None:
        lease = await self._leases.acquire(desired.lease)
        if lease is None:
            return  # a run holds the group: it is not ours to touch
        try:
            params = {"discard": Discard.ALWAYS.value}
            order = Order(
                desired.disk_id,
                OrderAction.CLOSE,
                desired.migration_id,
                lease.token,
                lease.resource,
                params=params,
            )
            await orders.give(order)
            log.info("recovered disk closed on a cache back to life", disk=desired.disk_id)
        finally:
            await self._leases.release(lease)

    async def _data_lost(self, instance: ComponentId) -> tuple[list[str], str] | None:
        key = ComponentKeys(self._store.keys, instance).outcomes
        raw = await self._store.run(lambda r: r.hgetall(key))
        disks, reason = [], ""
        for disk, value in raw.items():
            try:
                outcome = OrderOutcome.from_json(value)
            except ValueError:
                continue
            if outcome.code is OutcomeCode.DATA_LOST:
                disks.append(text(disk))
                reason = f"its data is lost: {outcome.reason}"
        return (disks, reason) if disks else None

    def _depends(self, record: MigrationRecord, loss: Loss) -> bool:
        if not depends_on(record, loss.instance, self._onprem):
            return False
        return loss.disks is None or any(component_disk(d) in loss.disks for d in record.disks)

    async def _groups(self) -> list[list[MigrationRecord]]:
        migrations = self._migrations
        groups = []
        for group_id in await migrations.active_groups():
            info = await migrations.group(group_id)
            if info is None:
                continue
            stored = await migrations.get_many(list(info.members))
            groups.append([load(s.record) for s in stored])
        return groups

    async def _ask(self, members: list[MigrationRecord], loss: Loss) -> list[str]:
        """Every member of the group, once; the event names those newly asked."""
        migrations = self._migrations
        asked = []
        lost = Lost(str(loss.instance), loss.reason)
        for record in members:
            if ASK_RECOVER in await migrations.asks(record.migration_id):
                continue
            await migrations.ask(record.migration_id, ASK_RECOVER, lost.encode())
            asked.append(record.migration_id)
        if asked:
            log.warning(
                "component lost: its VMs go back", component=lost.component, migrations=asked
            )
            await self._events.append(
                RecoveryEvent.RECOVERY_STARTED.value,
                self._clock.now().isoformat(),
                component=lost.component,
                reason=lost.reason,
                migrations=",".join(asked),
            )
        return asked


def recovery_trigger(
    settings: Settings,
    store: StateStore,
    reader: HeartbeatReader,
    clock: Clock,
    board: HealthBoard | None = None,
) -> RecoveryTrigger | None:
    """The trigger, when the appliance expects the tbc components (else: nothing to lose)."""
    expected = set(expected_components(settings))
    instances = [i for i in tbc_instances(settings) if i in expected]
    if not instances:
        return None
    return RecoveryTrigger(
        store,
        reader,
        instances,
        onprem=str(tbc_instances(settings)[0]),
        after_s=recovery_after_s(settings),
        interval_s=max(0.2, min(settings.component_heartbeat_interval_s, 5.0)),
        clock=clock,
        board=board,
    )
