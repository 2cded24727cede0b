"""A group leaves the scheduler's running set only after its lease is released.

Before: the run was dropped from the running set first and its lease released
after; a tick in between took the lease again - same owner, lease still valid,
so the same token - and started a new run, whose lease the late release then
deleted. Here a gate holds the release while the test ticks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import structlog

from appliance.clock import FakeClock
from appliance.datapath.buffers import BufferBudget
from appliance.datapath.checkpoint import CheckpointStore
from appliance.datapath.chunks import MAX_DATA_RUN
from appliance.embedded import RedisServer
from appliance.errors import StateStoreUnavailable
from appliance.orchestrator.context import Deps, OrchestratorConfig
from appliance.orchestrator.record import load
from appliance.orchestrator.reporting import Reporter
from appliance.orchestrator.requests import CloneRequests
from appliance.orchestrator.scheduler import PAUSED_RETRY_S, Run, Scheduler, group_lease
from appliance.sealing import Sealer
from appliance.sink import MemorySink
from appliance.sites.lab.site import LabSite
from appliance.sites.model import VmConfig
from appliance.state.checkpoints import RedisCheckpointStore
from appliance.state.events import EventLog
from appliance.state.keys import Keys
from appliance.state.leases import Lease, Leases
from appliance.state.migrations import GroupInfo, MigrationStore
from appliance.state.policy import Policies
from appliance.state.store import StateStore, connect
from tests.support.lab import build_lab
from tests.support.redisfields import field_int
from tests.unit.test_clone_requests import KEYS, VMS, NoCloud, clone

OWNER = "ferry-unit/1"


class GatedLeases(Leases):
    """Real leases whose release of a group's lease waits at a gate the test opens."""

    def __init__(self, store: StateStore, owner: str, ttl_s: float) -> None:
        super().__init__(store, owner, ttl_s)
        self.releasing = asyncio.Event()
        self.gate = asyncio.Event()
        self.released = asyncio.Event()

    async def release(self, lease: Lease) -> None:
        if not lease.resource.startswith("group:"):
            await super().release(lease)
            return
        self.releasing.set()
        await self.gate.wait()
        await super().release(lease)
        self.released.set()  # the caller carries on without a pause: before any waiter wakes


class StallingSite(LabSite):
    """The on-prem lab site; once armed, the next look at a VM fails as if Redis went away
    (the run pauses: a transient error), and every later look waits until the test ends."""

    armed = False
    stalled: asyncio.Event
    looks = 0

    async def get_vm(self, vm_id: str) -> VmConfig:
        if self.armed:
            self.looks += 1
            if self.looks == 1:
                raise StateStoreUnavailable(ConnectionError("injected"))
            self.stalled.set()
            await asyncio.Event().wait()
        return await super().get_vm(vm_id)


@dataclass
class Env:
    deps: Deps
    leases: GatedLeases
    onprem: StallingSite
    redis: aioredis.Redis
    keys: Keys


@pytest.fixture
async def env(
    redis: aioredis.Redis, redis_server: RedisServer, keys: Keys, data_dir: Path
) -> AsyncIterator[Env]:
    await build_lab(data_dir, VMS, fill=False)
    onprem = StallingSite.open(data_dir / "sites" / "onprem")
    onprem.stalled = asyncio.Event()
    cloud = LabSite.open(data_dir / "sites" / "cloud")
    store = StateStore(connect(redis_server.url), keys, retry_seconds=0.5, retry_attempts=2)
    leases = GatedLeases(store, OWNER, 30.0)
    clock = FakeClock()

    def checkpoints(transfer_id: str, lease: Lease | None) -> CheckpointStore:
        return RedisCheckpointStore(store.redis, store.keys, transfer_id, lease=lease)

    deps = Deps(
        config=OrchestratorConfig(appliance_id="ferry-unit"),
        store=store,
        migrations=MigrationStore(store),
        leases=leases,
        policies=Policies(store),
        events=EventLog(store),
        reporter=Reporter("ferry-unit", MemorySink(), clock),
        sites={"onprem": onprem, "cloud": cloud},
        cloud=NoCloud(),
        checkpoints=checkpoints,
        sealer=Sealer(KEYS),
        clock=clock,
        buffers=BufferBudget(4, MAX_DATA_RUN),
    )
    yield Env(deps, leases, onprem, redis, keys)
    await onprem.close()
    await cloud.close()
    await store.close()


async def test_a_tick_while_a_run_releases_its_lease_starts_nothing(env: Env) -> None:
    (answer,) = await CloneRequests(env.deps).handle(clone(["vm-0001"]))
    stored = await env.deps.migrations.get(answer.body.migration_id)
    assert stored is not None
    record = load(stored.record)
    key = env.keys.lease(group_lease(record.group_id))
    scheduler = Scheduler(env.deps)
    clock = env.deps.clock
    assert isinstance(clock, FakeClock)
    env.onprem.armed = True
    try:
        await scheduler.tick()  # admits the group; its run pauses on the injected error
        await asyncio.wait_for(env.leases.releasing.wait(), timeout=30)
        first_token = await field_int(env.redis, key, "token")

        with structlog.testing.capture_logs() as logs:
            await scheduler.tick()  # the release is held right now
        assert scheduler.running_groups == [record.group_id]
        assert [e for e in logs if e["event"] == "taking over group"] == []
        assert await field_int(env.redis, key, "token") == first_token

        env.leases.gate.set()
        await asyncio.wait_for(env.leases.released.wait(), timeout=30)
        assert scheduler.running_groups == []
        assert await env.redis.exists(key) == 0  # released, and nobody took it yet

        await scheduler.tick()  # a paused group waits a moment before it is retried...
        assert scheduler.running_groups == []
        clock.advance(PAUSED_RETRY_S)
        await scheduler.tick()  # ...then it is taken up again, under a new token
        await asyncio.wait_for(env.onprem.stalled.wait(), timeout=30)
        token = await field_int(env.redis, key, "token")
        assert token == first_token + 1
        assert await env.leases.renew(Lease(group_lease(record.group_id), OWNER, token))
    finally:
        env.leases.gate.set()
        await scheduler.stop_all()


class WaitingRuns:
    """Runs that wait until stopped; counts the starts per group."""

    def __init__(self) -> None:
        self.starts: dict[str, int] = {}

    def __call__(self, deps: Deps, lease: Lease, group: GroupInfo, cancel: asyncio.Event) -> Run:
        self.starts[group.group_id] = self.starts.get(group.group_id, 0) + 1
        return _WaitingRun()


class _WaitingRun:
    async def run(self) -> None:
        await asyncio.Event().wait()


@pytest.mark.timeout(60)
async def test_a_held_scheduler_starts_no_run_until_the_hold_ends(env: Env) -> None:
    """A reset holds the scheduler: its runs stop, and a tick meanwhile resumes none (before,
    the tick a stopped run's end woke took the group again, and the reset, asking for the
    group's lease, met this process's own new run). Runs stopped before their first step
    (just started by a tick) let go of their leases too."""
    await CloneRequests(env.deps).handle(clone(["vm-0001", "vm-0002"]))
    env.leases.gate.set()  # releases go through at once here
    runs = WaitingRuns()
    scheduler = Scheduler(env.deps, runs)
    try:
        await scheduler.tick()
        groups = scheduler.running_groups
        assert len(groups) == 2
        async with scheduler.held():  # stops the runs, which had not even started
            assert scheduler.running_groups == []
            for group_id in groups:
                assert await env.redis.exists(env.keys.lease(group_lease(group_id))) == 0
            await scheduler.tick()
            assert scheduler.running_groups == []
            assert runs.starts == dict.fromkeys(groups, 1)
            reset = Leases(env.deps.store, f"{OWNER}/reset", 30.0)
            taken = await reset.acquire(group_lease(groups[0]))
            assert taken is not None
            await reset.release(taken)
        await scheduler.tick()  # the hold over, the groups are taken up again
        assert scheduler.running_groups == groups
        assert runs.starts == dict.fromkeys(groups, 2)
    finally:
        await scheduler.stop_all()
