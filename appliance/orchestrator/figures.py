"""What a warm or tbc VM's cloud cache says of it: last epoch, RPO lag, dirty bytes, cache use.

Read from the heartbeat of the cache instance the record names
(:func:`~appliance.orchestrator.limits.cache_node_of`), whose figures
(``appliance/components/cache_runtime.py``, ``status``) hold, per disk,
``committed_epoch``, ``committed_age_s``, ``dirty_bytes_per_disk`` and
``cache_bytes_per_disk``, keyed by the disk's id there (:func:`component_disk`).
A VM's figures cover all its disks (the lowest epoch, the oldest commit, the
sums) and are given only when the cache reports every one of them; otherwise,
for cold migrations, and while the cache is silent, they are None: nothing is
guessed.

The age of the last commit is measured by the cache's own monotonic clock, and
the heartbeat's silence by Redis's clock, so the RPO lag (their sum) needs no
two hosts to agree on the time; ``last_epoch_at`` is the appliance's clock
minus that lag.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from appliance.clock import Clock
from appliance.components.heartbeat import ComponentHealth, ComponentReport
from appliance.components.orders import ComponentId
from appliance.errors import StateStoreUnavailable
from appliance.logs import get_logger
from appliance.orchestrator.limits import cache_node_of
from appliance.orchestrator.record import DiskPlan, MigrationRecord
from appliance.orchestrator.states import TERMINAL, Step
from appliance.state.policy import Policies
from messages.common import MigrationType

log = get_logger(__name__)
CACHE_KIND = "cache"


def component_disk(disk: DiskPlan) -> str:
    """The id the components know a disk by: ``<migration>-<disk>`` (unique per migration)."""
    return disk.served_as


@dataclass(frozen=True, slots=True)
class CacheFigures:
    committed_epoch: int | None = None
    last_epoch_at: datetime | None = None
    rpo_lag_s: float | None = None
    dirty_bytes: int | None = None
    cache_bytes: int | None = None


def _per_disk(figures: Mapping[str, Any], name: str, disks: Sequence[str]) -> list[Any] | None:
    """The figure for every disk, or None when the cache does not report one of them."""
    values = figures.get(name)
    if not isinstance(values, Mapping) or not all(d in values for d in disks):
        return None
    return [values[d] for d in disks]


def _ints(values: list[Any] | None) -> list[int] | None:
    if values is None or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return None
    return values


def figures_from(report: ComponentReport, disks: Sequence[str], now: datetime) -> CacheFigures:
    """A VM's figures from its cache's heartbeat report."""
    if not disks or report.failed or report.silent_s is None:
        return CacheFigures()
    figures = report.figures
    epochs = _ints(_per_disk(figures, "committed_epoch", disks))
    dirty = _ints(_per_disk(figures, "dirty_bytes_per_disk", disks))
    used = _ints(_per_disk(figures, "cache_bytes_per_disk", disks))
    ages = _per_disk(figures, "committed_age_s", disks)
    lag = None
    if ages is not None and all(isinstance(a, int | float) for a in ages):
        lag = round(max(float(a) for a in ages) + report.silent_s, 3)
    return CacheFigures(
        committed_epoch=min(epochs) if epochs is not None else None,
        last_epoch_at=now - timedelta(seconds=lag) if lag is not None else None,
        rpo_lag_s=lag,
        dirty_bytes=sum(dirty) if dirty is not None else None,
        cache_bytes=sum(used) if used is not None else None,
    )


class CacheFigureReader:
    """Reads a record's cache figures from the component heartbeats in Redis."""

    def __init__(self, health: ComponentHealth, clock: Clock) -> None:
        self._health = health
        self._clock = clock

    async def read(self, record: MigrationRecord) -> CacheFigures | None:
        """None for a migration no cache serves (cold, queued, finished)."""
        if record.migration_type is MigrationType.COLD or not record.disks:
            return None
        if record.step is Step.QUEUED or record.step in TERMINAL:
            return None
        try:
            report = await self._health.report(ComponentId(CACHE_KIND, cache_node_of(record)))
        except (StateStoreUnavailable, ValueError) as error:
            # A status answer without figures beats no answer: say why in the log.
            log.info("no cache figures", migration_id=record.migration_id, error=str(error))
            return CacheFigures()
        disks = [component_disk(disk) for disk in record.disks]
        return figures_from(report, disks, self._clock.now())

    async def dirty_over_threshold(self, record: MigrationRecord, policies: Policies) -> bool:
        """Has the VM as much dirty in its cache as its policy's ``rpo_dirty_bytes``? Then
        an epoch is due now (what a resting VM's run asks before it waits on)."""
        figures = await self.read(record)
        if figures is None or figures.dirty_bytes is None:
            return False
        rpo = await policies.rpo(record.source_cluster, record.target_cluster)
        return figures.dirty_bytes >= rpo.dirty_bytes
