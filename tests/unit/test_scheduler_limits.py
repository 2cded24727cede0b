"""The scheduler's three limits against a real redis-server: cold in progress (8), warm/tbc in
progress per cache node (4), VMs resting in the cloud per cache node (20). Each queues what
exceeds it, in order, admits when a slot frees, and follows a policy change at the next tick.

The scheduler is the real one (real records, leases, admission, policies); only the group
runs are stand-ins that the test holds at a gate, then moves to a resting step or to an end
through the real journal (fenced, compare-and-set writes).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import redis.asyncio as aioredis

from appliance.clock import FakeClock
from appliance.datapath.buffers import BufferBudget
from appliance.datapath.checkpoint import CheckpointStore
from appliance.datapath.chunks import MAX_DATA_RUN
from appliance.embedded import RedisServer
from appliance.orchestrator.context import Deps, OrchestratorConfig
from appliance.orchestrator.journal import Journal
from appliance.orchestrator.limits import (
    DEFAULT_CACHE_NODE,
    Limit,
    Room,
    Slot,
    may_leave_rest,
    slot_of,
)
from appliance.orchestrator.record import MigrationRecord, TransferOptions, dump, load
from appliance.orchestrator.reporting import Reporter
from appliance.orchestrator.scheduler import Scheduler
from appliance.orchestrator.states import Step
from appliance.sealing import Sealer
from appliance.sink import MemorySink
from appliance.state.checkpoints import RedisCheckpointStore
from appliance.state.events import EventLog
from appliance.state.keys import Keys
from appliance.state.leases import Lease, Leases
from appliance.state.migrations import GroupInfo, MigrationStore, NewMigration
from appliance.state.policy import Policies, Policy, PolicyDefaults
from appliance.state.store import StateStore, connect
from messages.common import MigrationType
from messages.events import SourceCloneResponse
from messages.keys import ApplianceKeyPair
from tests.unit.test_clone_requests import NoCloud

REST = Step.POWERING_OFF
"""Stands for the tbc machine's *running in cloud* step, which this build does not have yet:
the scheduler is told it rests, as states.RESTING will say of the real one."""
RESTING = frozenset({REST})
AT = "2026-12-01T12:00:00+00:00"


@dataclass
class HeldRun:
    """A group's run, held until the test says how it goes on: rest in the cloud, or end."""

    deps: Deps
    lease: Lease
    info: GroupInfo
    go: asyncio.Event = field(default_factory=asyncio.Event)
    finish: asyncio.Event = field(default_factory=asyncio.Event)
    rested: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    resting: bool = False

    def rest(self) -> None:
        self.resting = True
        self.go.set()

    def end(self) -> None:
        self.finish.set()
        self.go.set()

    async def run(self) -> None:
        journal = Journal(self.deps, self.lease)
        stored = await self.deps.migrations.get_many([*self.info.members])
        records = [load(s.record) for s in stored]
        await self.go.wait()
        if self.resting:
            records = [await journal.advance(r, REST) for r in records]
            self.rested.set()
            await self.finish.wait()
        for record in records:
            rolled = await journal.advance(record, Step.ROLLING_BACK)
            await journal.advance(rolled, Step.CANCELLED)
        self.ended.set()


@dataclass
class Env:
    deps: Deps
    sink: MemorySink
    runs: dict[str, HeldRun] = field(default_factory=dict)
    count: int = 0

    def scheduler(self) -> Scheduler:
        def make(deps: Deps, lease: Lease, info: GroupInfo, _cancel: asyncio.Event) -> HeldRun:
            run = HeldRun(deps, lease, info)
            self.runs[info.group_id] = run
            return run

        return Scheduler(self.deps, make, RESTING)

    async def queue(
        self,
        kind: MigrationType,
        *,
        node: str | None = None,
        cluster: str | None = None,
    ) -> str:
        """One queued group of one VM; returns its group id."""
        self.count += 1
        n = self.count
        admission = await self.deps.migrations.next_admission()
        record = _record(n, kind, node, cluster, admission)
        new = NewMigration(record.migration_id, "queued", "queued", dump(record))
        assert await self.deps.migrations.create_group(record.group_id, "r", admission, [new])
        return record.group_id

    def started(self) -> list[str]:
        return list(self.runs)


def _record(
    n: int, kind: MigrationType, node: str | None, cluster: str | None, admission: int = 0
) -> MigrationRecord:
    return MigrationRecord(
        migration_id=f"m-{n}", request_id="r", correlation_id=f"c-{n}", group_id=f"g-{n}",
        admission=admission, site="onprem", vm_id=f"vm-{n}", vm_name=f"vm-{n}",
        migration_type=kind, step=Step.QUEUED, target_site="cloud", target_pool=None,
        target_name=f"vm-{n}", network_map=(), options=TransferOptions(), disks=(),
        source_cluster=cluster, cache_node=node, created_at=AT, updated_at=AT,
    )  # fmt: skip


@pytest.fixture
async def env(redis: aioredis.Redis, redis_server: RedisServer, keys: Keys) -> AsyncIterator[Env]:
    store = StateStore(connect(redis_server.url), keys)
    clock = FakeClock()
    sink = MemorySink()

    def checkpoints(transfer_id: str, lease: Lease | None) -> CheckpointStore:
        return RedisCheckpointStore(store.redis, store.keys, transfer_id, lease=lease)

    deps = Deps(
        config=OrchestratorConfig(appliance_id="ferry-unit"),
        store=store,
        migrations=MigrationStore(store),
        leases=Leases(store, "ferry-unit/1", 30.0),
        policies=Policies(store, PolicyDefaults()),  # HDM's: 8, 4 per node, 20 per node
        events=EventLog(store),
        reporter=Reporter("ferry-unit", sink, clock),
        sites={},
        cloud=NoCloud(),
        checkpoints=checkpoints,
        sealer=Sealer(ApplianceKeyPair.generate()),
        clock=clock,
        buffers=BufferBudget(2, MAX_DATA_RUN),
    )
    yield Env(deps, sink)
    await store.close()


async def _ended(env: Env, group_id: str) -> None:
    """Let a held run end (its migrations cancelled: finished, holding nothing)."""
    env.runs[group_id].end()
    await asyncio.wait_for(env.runs[group_id].ended.wait(), timeout=30)


async def _rest(env: Env, group_id: str) -> None:
    env.runs[group_id].rest()
    await asyncio.wait_for(env.runs[group_id].rested.wait(), timeout=30)


async def _stop(env: Env, scheduler: Scheduler) -> None:
    for run in env.runs.values():
        run.end()
    await scheduler.stop_all()


def _positions(sink: MemorySink) -> dict[str, int]:
    positions: dict[str, int] = {}
    for event in sink.events:
        if isinstance(event, SourceCloneResponse) and event.body.queue_position is not None:
            positions[event.body.migration_id] = event.body.queue_position
    return positions


async def test_cold_in_progress_is_limited_to_eight_and_the_rest_wait_in_order(env: Env) -> None:
    groups = [await env.queue(MigrationType.COLD) for _ in range(10)]
    scheduler = env.scheduler()
    try:
        await scheduler.tick()
        assert env.started() == groups[:8]
        assert _positions(env.sink) == {"m-9": 1, "m-10": 2}
        await scheduler.tick()
        assert env.started() == groups[:8], "nothing frees, nothing starts"
        await _ended(env, groups[3])
        await scheduler.tick()
        assert env.started() == groups[:9], "one slot freed: the first in line, not the last"
        assert _positions(env.sink)["m-10"] == 1
    finally:
        await _stop(env, scheduler)


async def test_warm_and_tbc_are_limited_per_cache_node_and_never_take_cold_slots(env: Env) -> None:
    on_a = [await env.queue(MigrationType.TBC, node="cache-a") for _ in range(5)]
    on_a.append(await env.queue(MigrationType.WARM, node="cache-a"))
    on_b = [await env.queue(MigrationType.WARM, node="cache-b") for _ in range(2)]
    cold = [await env.queue(MigrationType.COLD) for _ in range(8)]
    scheduler = env.scheduler()
    try:
        await scheduler.tick()
        started = set(env.started())
        assert set(on_a[:4]) <= started and not set(on_a[4:]) & started, "4 per node"
        assert set(on_b) <= started, "another node's migrations go ahead of those waiting on a"
        assert set(cold) <= started, "separate limits: eight cold ones run beside them"
        await _ended(env, on_a[1])
        await scheduler.tick()
        assert on_a[4] in env.runs and on_a[5] not in env.runs
    finally:
        await _stop(env, scheduler)


async def test_a_resting_vm_holds_no_slot_but_counts_against_its_node_resting_limit(
    env: Env,
) -> None:
    await env.deps.policies.set(
        None, Policy(max_in_progress_per_cache_node=2, max_resting_per_cache_node=3)
    )
    tbc = [await env.queue(MigrationType.TBC, node="cache-a") for _ in range(4)]
    scheduler = env.scheduler()
    try:
        await scheduler.tick()
        assert env.started() == tbc[:2]
        await _rest(env, tbc[0])
        await _rest(env, tbc[1])
        await scheduler.tick()
        # Two rest (no slot), one more in progress: 2 + 1 = 3 on the node, its resting limit.
        assert env.started() == tbc[:3]
        await _ended(env, tbc[0])  # migrated back: its place on the node frees
        await scheduler.tick()
        assert env.started() == tbc
    finally:
        await _stop(env, scheduler)


async def test_a_limit_changed_by_policy_applies_at_the_next_tick(env: Env) -> None:
    await env.deps.policies.set(None, Policy(max_concurrent_migrations=2))
    groups = [await env.queue(MigrationType.COLD) for _ in range(5)]
    tbc = [await env.queue(MigrationType.TBC, node="cache-a") for _ in range(3)]
    scheduler = env.scheduler()
    try:
        await scheduler.tick()
        assert env.started() == [*groups[:2], *tbc]
        await env.deps.policies.set(None, Policy(max_concurrent_migrations=4))
        await scheduler.tick()
        assert env.started()[5:] == groups[2:4], "two more cold slots: the next two in line"
        assert groups[4] not in env.runs
    finally:
        await _stop(env, scheduler)


async def test_a_cluster_policy_sets_the_per_node_limit_of_that_cluster_s_migrations(
    env: Env,
) -> None:
    await env.deps.policies.set("lab", Policy(max_in_progress_per_cache_node=1))
    lab = [await env.queue(MigrationType.TBC, node="cache-a", cluster="lab") for _ in range(2)]
    other = [await env.queue(MigrationType.TBC, node="cache-b") for _ in range(2)]
    scheduler = env.scheduler()
    try:
        await scheduler.tick()
        assert env.started() == [lab[0], *other]
    finally:
        await _stop(env, scheduler)


async def test_a_resting_vm_leaves_its_rest_for_work_only_when_its_node_has_a_slot(
    env: Env,
) -> None:
    await env.deps.policies.set(None, Policy(max_in_progress_per_cache_node=1))
    first, second = [await env.queue(MigrationType.TBC, node="cache-a") for _ in range(2)]
    scheduler = env.scheduler()
    try:
        await scheduler.tick()
        await _rest(env, first)
        await scheduler.tick()
        assert env.started() == [first, second]  # the resting one holds no slot
        stored = await env.deps.migrations.get_many(["m-1"])
        resting = load(stored[0].record)
        policies, migrations = env.deps.policies, env.deps.migrations
        assert resting.step is REST
        assert not await may_leave_rest(policies, migrations, resting, RESTING), "1 in progress"
        await _ended(env, second)
        assert await may_leave_rest(policies, migrations, resting, RESTING)
    finally:
        await _stop(env, scheduler)


def _at(record: MigrationRecord, step: Step) -> MigrationRecord:
    return record.with_step(step, AT)


async def test_the_room_counts_hdm_s_defaults_per_node(env: Env) -> None:
    policies = env.deps.policies
    tbc = [_record(n, MigrationType.TBC, "cache-a", None) for n in range(30)]
    running = [_at(r, Step.PREPARING) for r in tbc[:4]]
    room = Room(policies, running, RESTING)
    assert not await room.fits([tbc[4]]), "a fifth in progress on cache-a waits"
    assert (Limit.CACHE_IN_PROGRESS, "cache-a") in room.waiting
    assert await room.fits([_record(99, MigrationType.TBC, "cache-b", None)])
    resting = [_at(r, REST) for r in tbc[:19]]
    assert {slot_of(r, RESTING) for r in resting} == {Slot.RESTING}
    room = Room(policies, resting, RESTING)
    assert await room.fits([tbc[19]]), "19 resting + 1 = 20"
    room.take([tbc[19]])
    assert not await room.fits([tbc[20]]), "20 on the node: the next waits"
    unnamed = Room(policies, [_at(_record(1, MigrationType.WARM, None, None), Step.PREPARING)])
    assert unnamed.held[(Limit.CACHE_IN_PROGRESS, DEFAULT_CACHE_NODE)] == 1


@dataclass
class StubbornRun:
    """A run that loses the first cancel it gets (as a lost cancel would) and goes on."""

    started: asyncio.Event
    swallowed: asyncio.Event

    async def run(self) -> None:
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.swallowed.set()
        await asyncio.Event().wait()  # resting forever, until cancelled again


async def test_a_run_that_lost_its_cancel_is_cancelled_again_at_stop(env: Env) -> None:
    started, swallowed = asyncio.Event(), asyncio.Event()

    def make(_deps: Deps, _lease: Lease, _info: GroupInfo, _cancel: asyncio.Event) -> StubbornRun:
        return StubbornRun(started, swallowed)

    scheduler = Scheduler(env.deps, make, RESTING)
    stop = asyncio.Event()
    await env.queue(MigrationType.COLD)
    running = asyncio.create_task(scheduler.run(stop))
    await asyncio.wait_for(started.wait(), timeout=30)
    stop.set()
    await asyncio.wait_for(running, timeout=30)  # without the second cancel: never
    assert swallowed.is_set()
