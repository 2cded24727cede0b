"""The scheduler's limits: HDM's three, each queueing what exceeds it, in order.

What a migration holds depends on its type and step (:func:`slot_of`):

* a **cold** migration in progress holds a cold slot: at most
  ``max_concurrent_migrations`` (default 8) on the appliance, and, for a
  cluster whose own policy sets it, at most that many touching the cluster
  (as its source VM's cluster or the target cluster it asked for);
* a **warm or tbc** migration in progress holds a slot on its cache node
  (:func:`cache_node_of`): at most ``max_in_progress_per_cache_node``
  (default 4) per node;
* a warm or tbc VM **resting** in the cloud (``states.RESTING``) holds no
  slot at all, only a place on its cache node: at most
  ``max_resting_per_cache_node`` (default 20) per node, counting those in
  progress there (each will rest when it gets there), so admitting one never
  pushes a node past it later.

Each limit comes from the policies, read afresh on every tick
(:meth:`~appliance.state.policy.Policies.limits`: a cluster's policy, else the
default policy, else the settings), so a change applies at the next tick. The
per-node limits that hold for a group are its members' (the lowest, when
they differ). A queued group that does not fit waits, and so does every later
group that needs the limit it waits on (order is kept per limit), while
groups that need other limits go ahead. A group may always start when what
it needs is empty, however large, so it cannot wait forever.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from enum import StrEnum

from appliance.orchestrator.record import MigrationRecord, load
from appliance.orchestrator.states import RESTING, TERMINAL, Step
from appliance.state.migrations import MigrationStore
from appliance.state.policy import Limits, Policies
from messages.common import MigrationType

DEFAULT_CACHE_NODE = "cache-1"
"""The cache instance of a warm/tbc record that names none: the appliance's default cache
(the embedded ``cache/cache-1``), where its limits count and its figures are read."""


class Slot(StrEnum):
    NONE = "none"  # queued or finished: holds nothing
    COLD = "cold"  # a cold migration in progress
    IN_PROGRESS = "in_progress"  # a warm or tbc migration in progress, on its cache node
    RESTING = "resting"  # a warm or tbc VM resting in the cloud, on its cache node


class Limit(StrEnum):
    COLD = "cold in progress"
    COLD_CLUSTER = "cold in progress in cluster"
    CACHE_IN_PROGRESS = "warm/tbc in progress on cache node"
    CACHE_RESTING = "resting in the cloud on cache node"


Bucket = tuple[Limit, str]
"""One limit and what it is counted over (a cluster, a cache node; "" appliance-wide)."""


def slot_of(record: MigrationRecord, resting: frozenset[Step] = RESTING) -> Slot:
    if record.step is Step.QUEUED or record.step in TERMINAL:
        return Slot.NONE
    if record.migration_type is MigrationType.COLD:
        return Slot.COLD
    return Slot.RESTING if record.step in resting else Slot.IN_PROGRESS


def cache_node_of(record: MigrationRecord) -> str:
    return record.cache_node or DEFAULT_CACHE_NODE


def clusters_of(record: MigrationRecord) -> set[str]:
    return {c for c in (record.source_cluster, record.target_cluster) if c}


def buckets_of(record: MigrationRecord, slot: Slot) -> list[Bucket]:
    """Every limit a migration holding ``slot`` counts against."""
    if slot is Slot.COLD:
        return [(Limit.COLD, ""), *((Limit.COLD_CLUSTER, c) for c in sorted(clusters_of(record)))]
    node = cache_node_of(record)
    if slot is Slot.IN_PROGRESS:
        return [(Limit.CACHE_IN_PROGRESS, node), (Limit.CACHE_RESTING, node)]
    if slot is Slot.RESTING:
        return [(Limit.CACHE_RESTING, node)]
    return []


def admitted_slot(record: MigrationRecord) -> Slot:
    """What a queued migration will hold once admitted."""
    return Slot.COLD if record.migration_type is MigrationType.COLD else Slot.IN_PROGRESS


class Room:
    """What every limit holds now, against its limit; built afresh on every tick."""

    def __init__(
        self,
        policies: Policies,
        running: Iterable[MigrationRecord],
        resting: frozenset[Step] = RESTING,
    ) -> None:
        self._policies = policies
        self.held: Counter[Bucket] = Counter()
        for record in running:
            self.held.update(buckets_of(record, slot_of(record, resting)))
        self._limits: dict[tuple[str | None, ...], Limits] = {}
        self._cluster_limits: dict[str, int | None] = {}
        self.waiting: set[Bucket] = set()  # limits a group already waits on: keep order

    async def _limits_for(self, record: MigrationRecord) -> Limits:
        key = (record.source_cluster, record.target_cluster)
        if key not in self._limits:
            self._limits[key] = await self._policies.limits(*key)
        return self._limits[key]

    async def _limit(self, bucket: Bucket, members: Sequence[MigrationRecord]) -> int | None:
        kind, over = bucket
        if kind is Limit.COLD:
            if "" not in self._cluster_limits:  # appliance-wide: default policy, else setting
                self._cluster_limits[""] = (await self._policies.limits()).cold_in_progress
            return self._cluster_limits[""]
        if kind is Limit.COLD_CLUSTER:
            if over not in self._cluster_limits:
                own = await self._policies.own(over)
                self._cluster_limits[over] = own.max_concurrent_migrations
            return self._cluster_limits[over]
        limits = [await self._limits_for(record) for record in members]
        if kind is Limit.CACHE_IN_PROGRESS:
            return min(limit.cache_in_progress for limit in limits)
        return min(limit.cache_resting for limit in limits)

    @staticmethod
    def wanted(members: Sequence[MigrationRecord]) -> Counter[Bucket]:
        wanted: Counter[Bucket] = Counter()
        for record in members:
            wanted.update(buckets_of(record, admitted_slot(record)))
        return wanted

    async def fits(self, members: Sequence[MigrationRecord]) -> bool:
        """May this group start now? If not, it waits, and later groups that need a limit
        it waits on wait behind it."""
        wanted = self.wanted(members)
        full = set()
        for bucket, count in wanted.items():
            if bucket in self.waiting:
                full.add(bucket)
                continue
            limit = await self._limit(bucket, members)
            held = self.held[bucket]
            if limit is not None and held and held + count > limit:
                full.add(bucket)
        if full:
            self.waiting.update(full)
            return False
        return True

    def take(self, members: Sequence[MigrationRecord]) -> None:
        self.held.update(self.wanted(members))

    async def fits_leaving_rest(self, record: MigrationRecord) -> bool:
        """May this resting VM go back to work (a commit's bulk copy) on its node now? It
        keeps its place on the node; it needs an in-progress slot there."""
        bucket = (Limit.CACHE_IN_PROGRESS, cache_node_of(record))
        held = self.held[bucket]
        return not held or held + 1 <= (await self._limits_for(record)).cache_in_progress


async def running_records(migrations: MigrationStore) -> list[MigrationRecord]:
    """Every migration of an active group that holds something (neither queued nor over)."""
    records = []
    for group_id in await migrations.active_groups():
        info = await migrations.group(group_id)
        members = await migrations.get_many(list(info.members)) if info is not None else []
        records += [load(m.record) for m in members]
    return [r for r in records if r.step is not Step.QUEUED and r.step not in TERMINAL]


async def may_leave_rest(
    policies: Policies,
    migrations: MigrationStore,
    record: MigrationRecord,
    resting: frozenset[Step] = RESTING,
) -> bool:
    """Asked by a resting VM's run before it leaves the rest for work that holds a slot
    (a tbc commit's bulk copy): only while its cache node has an in-progress slot free;
    otherwise it stays resting and asks again later (it waits, it does not fail)."""
    room = Room(policies, await running_records(migrations), resting)
    return await room.fits_leaving_rest(record)
