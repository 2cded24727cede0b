"""The appliance's Prometheus metrics: migrations, transfers, RPO lag, components.

Read live when scraped (:meth:`ApplianceCollector.refresh` runs before each
scrape, on the loop): the migration counts hash (every migration by public
state, O(states)), the records of the active groups' members (the migrations
not yet finished: by type and state, the bytes done and the transfer rates,
each resting VM's RPO lag from its cache's heartbeat), each component's
heartbeat liveness, the supervisor's restart counts, and the failures and repairs
the repairer saw (appliance/service/repair.py) since the appliance started. Nothing is counted
twice: the figures are the ones the status answers and heartbeats already give.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance.clock import Clock
from appliance.components.heartbeat import ComponentHealth, Liveness
from appliance.components.orders import ComponentId
from appliance.errors import StateStoreUnavailable
from appliance.logs import get_logger
from appliance.orchestrator.context import Deps
from appliance.orchestrator.figures import CacheFigureReader
from appliance.orchestrator.record import MigrationRecord, load
from appliance.orchestrator.states import RESTING, Step
from appliance.service.components import EmbeddedComponents
from appliance.service.repair import RepairCounts
from appliance.settings import Settings
from appliance.state.migrations import MigrationStore
from appliance.state.store import StateStore

log = get_logger(__name__)
Restarts = Callable[[], Mapping[ComponentId, int]]
"""The supervisor's restart count of each component it runs."""


@dataclass(slots=True)
class _Snapshot:
    states: dict[str, int] = field(default_factory=dict)
    active: list[tuple[str, MigrationRecord]] = field(default_factory=list)
    """(public state, record) of each migration not yet finished."""
    lag: dict[tuple[str, str], float] = field(default_factory=dict)
    """RPO lag by (migration id, VM name) of each resting VM its cache reports."""
    live: dict[ComponentId, Liveness] = field(default_factory=dict)
    ok: bool = False


class ApplianceCollector(Collector):
    def __init__(
        self,
        migrations: MigrationStore,
        health: ComponentHealth,
        figures: CacheFigureReader,
        components: Sequence[ComponentId],
        restarts: Restarts | None = None,
        repairs: RepairCounts | None = None,
    ) -> None:
        self._repairs = repairs
        self._migrations = migrations
        self._health = health
        self._figures = figures
        self.components = tuple(components)
        self._restarts = restarts
        self._snapshot = _Snapshot()

    async def refresh(self) -> None:
        snapshot = _Snapshot()
        try:
            snapshot.states = await self._migrations.counts()
            for group_id in await self._migrations.active_groups():
                info = await self._migrations.group(group_id)
                if info is not None:
                    stored = await self._migrations.get_many(list(info.members))
                    snapshot.active += [(s.public, load(s.record)) for s in stored]
            for _, record in snapshot.active:
                if record.step in RESTING:
                    figures = await self._figures.read(record)
                    if figures is not None and figures.rpo_lag_s is not None:
                        snapshot.lag[(record.migration_id, record.vm_name)] = figures.rpo_lag_s
            for instance in self.components:
                snapshot.live[instance] = (await self._health.report(instance)).liveness
            snapshot.ok = True
        except StateStoreUnavailable as error:
            log.warning("metrics not read", error=str(error))
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot
        yield GaugeMetricFamily(
            "ferry_metrics_state_store_up", "1 when the last scrape read Redis", value=snap.ok
        )
        yield from self._migration_metrics(snap)
        yield from self._component_metrics(snap)
        if self._repairs is not None:
            yield from repair_metrics(self._repairs)

    def _migration_metrics(self, snap: _Snapshot) -> Iterator[Metric]:
        states = GaugeMetricFamily(
            "ferry_migrations", "Migrations by public state (failed: failures)", labels=["state"]
        )
        for state, count in sorted(snap.states.items()):
            states.add_metric([state], count)
        yield states
        active = GaugeMetricFamily(
            "ferry_migrations_active", "Unfinished migrations by type and state",
            labels=["type", "state"],
        )  # fmt: skip
        by = Counter((r.migration_type.value, public) for public, r in snap.active)
        for (kind, public), count in sorted(by.items()):
            active.add_metric([kind, public], count)
        yield active
        done = GaugeMetricFamily(
            "ferry_transfer_done_bytes", "Bytes copied by unfinished migrations", labels=["type"]
        )
        planned = GaugeMetricFamily(
            "ferry_transfer_planned_bytes", "Bytes unfinished migrations copy", labels=["type"]
        )
        rate = GaugeMetricFamily(
            "ferry_transfer_rate_bytes_per_second", "Sum of the transferring migrations' rates",
            labels=["type"],
        )  # fmt: skip
        kinds = sorted({r.migration_type.value for _, r in snap.active})
        for kind in kinds:
            records = [r for _, r in snap.active if r.migration_type.value == kind]
            done.add_metric([kind], sum(r.bytes_done for r in records))
            planned.add_metric([kind], sum(r.bytes_total for r in records))
            moving = [r for r in records if r.step is Step.TRANSFERRING]
            rate.add_metric([kind], sum(r.rate_bytes_per_s for r in moving))
        yield from (done, planned, rate)
        lag = GaugeMetricFamily(
            "ferry_rpo_lag_seconds", "A resting VM's epoch lag (age of its last committed epoch)",
            labels=["migration_id", "vm"],
        )  # fmt: skip
        for (migration_id, vm), seconds in sorted(snap.lag.items()):
            lag.add_metric([migration_id, vm], seconds)
        yield lag

    def _component_metrics(self, snap: _Snapshot) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "ferry_component_healthy", "1: heartbeats arrive (ok); 0: failed or stopping",
            labels=["kind", "name"],
        )  # fmt: skip
        for instance, liveness in snap.live.items():
            up.add_metric([instance.kind, instance.name], liveness is Liveness.OK)
        yield up
        if self._restarts is None:
            return
        restarts = CounterMetricFamily(
            "ferry_component_restarts", "Times the supervisor restarted the component",
            labels=["kind", "name"],
        )  # fmt: skip
        for instance, count in self._restarts().items():
            restarts.add_metric([instance.kind, instance.name], count)
        yield restarts


def repair_metrics(counts: RepairCounts) -> Iterator[Metric]:
    """Failures (any part of the board turning failed) and repairs, by board name."""
    failures = CounterMetricFamily(
        "ferry_component_failures", "Times the part turned failed", labels=["component"]
    )
    for name, count in sorted(counts.failures.items()):
        failures.add_metric([name], count)
    attempts = CounterMetricFamily(
        "ferry_component_repair_attempts", "Repair attempts (restarts, command runs)",
        labels=["component"],
    )  # fmt: skip
    for name, count in sorted(counts.attempts.items()):
        attempts.add_metric([name], count)
    repairs = CounterMetricFamily(
        "ferry_component_repairs", "Repairs ended: repaired, or gave up at the deadline",
        labels=["component", "outcome"],
    )  # fmt: skip
    for outcome, counter in (("repaired", counts.repaired), ("gave_up", counts.gave_up)):
        for name, count in sorted(counter.items()):
            repairs.add_metric([name, outcome], count)
    yield from (failures, attempts, repairs)


def appliance_registry(collector: ApplianceCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def build_collector(
    settings: Settings,
    deps: Deps,
    store: StateStore,
    clock: Clock,
    components: EmbeddedComponents | None,
    repairs: RepairCounts | None = None,
) -> ApplianceCollector:
    """The collector for the tbc components and the embedded ones (their restarts too)."""
    health = ComponentHealth(store, settings.component_timeout_s)
    names = settings.tbc_components.split(",") + settings.embedded_components.split(",")
    instances = list(dict.fromkeys(ComponentId.parse(n) for n in names if n))
    restarts: Restarts | None = None
    if components is not None:
        supervisor, supervised = components.supervisor, components.watch.instances

        def counted() -> Mapping[ComponentId, int]:
            return {instance: supervisor.restarts(instance) for instance in supervised}

        restarts = counted
    figures = CacheFigureReader(health, clock)
    return ApplianceCollector(deps.migrations, health, figures, instances, restarts, repairs)
