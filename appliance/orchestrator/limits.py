"""Per-cluster concurrency limits: a policy's ``max_concurrent_migrations`` for one cluster.

A migration counts against every cluster it touches (its source VM's cluster
and the target cluster it asked for). A cluster with a limit of its own
admits a group only while its running migrations plus the group's stay
within that limit (a group alone may always start, as with the global limit,
so an oversized group cannot wait forever); the appliance-wide limit (the
default policy's, else the setting) applies on top. Groups held back by a
cluster keep their order: once one waits, later groups touching that cluster
wait behind it, while groups of other clusters go ahead.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

from appliance.orchestrator.record import MigrationRecord
from appliance.state.policy import Policies


def clusters_of(record: MigrationRecord) -> set[str]:
    return {c for c in (record.source_cluster, record.target_cluster) if c}


class ClusterRoom:
    """What each cluster runs now, against its own limit; read afresh on every tick."""

    def __init__(self, policies: Policies, running: Iterable[MigrationRecord]) -> None:
        self._policies = policies
        self._running: Counter[str] = Counter()
        for record in running:
            self._running.update(clusters_of(record))
        self._limits: dict[str, int | None] = {}
        self._waiting: set[str] = set()  # clusters a group already waits on: keep order

    async def _limit(self, cluster: str) -> int | None:
        if cluster not in self._limits:
            own = await self._policies.own(cluster)
            self._limits[cluster] = own.max_concurrent_migrations
        return self._limits[cluster]

    async def fits(self, members: Sequence[MigrationRecord]) -> bool:
        """May this group start now as far as cluster limits go? If not, it waits in line."""
        wanted: Counter[str] = Counter()
        for record in members:
            wanted.update(clusters_of(record))
        full = set()
        for cluster, count in wanted.items():
            limit = await self._limit(cluster)
            if cluster in self._waiting:
                full.add(cluster)
            elif (
                limit is not None
                and self._running[cluster]
                and (self._running[cluster] + count > limit)
            ):
                full.add(cluster)
        if full:
            self._waiting.update(full)
            return False
        return True

    def take(self, members: Sequence[MigrationRecord]) -> None:
        for record in members:
            self._running.update(clusters_of(record))
