"""The component control channel against a real redis-server: fenced, idempotent orders.

The component side runs in-process here (an OrderDesk over the EchoRuntime);
tests/integration/test_component_processes.py runs it as real processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from appliance.components.control import ComponentOrders, OrderDesk
from appliance.components.heartbeat import ComponentHealth, HeartbeatWriter, Liveness
from appliance.components.ledger import Ledger
from appliance.components.orders import (
    ComponentId,
    ComponentKeys,
    ComponentRuntime,
    Order,
    OrderAction,
    OutcomeCode,
    OutcomeKind,
)
from appliance.components.runtimes import (
    ComponentConfig,
    UnavailableRuntime,
    runtime_by_name,
    runtime_for_kind,
)
from appliance.embedded import RedisServer
from appliance.errors import ComponentSilent, LeaseLost, NotConfigured, OrderRefused, StaleToken
from appliance.settings import Settings
from appliance.state.keys import Keys
from appliance.state.leases import Lease, Leases
from appliance.state.store import StateStore, connect
from tests.support.echo import EchoRuntime, applied_orders

CACHE = ComponentId("cache", "cache-1")
RESOURCE = "group:g-1"
WAIT_S = 10.0


@pytest.fixture
async def store(
    redis: aioredis.Redis, redis_server: RedisServer, keys: Keys
) -> AsyncIterator[StateStore]:
    store = StateStore(connect(redis_server.url), keys, retry_seconds=0.5, retry_attempts=2)
    yield store
    await store.close()


def config_for(data_dir: Path, url: str, keys: Keys) -> ComponentConfig:
    return ComponentConfig(
        instance=CACHE,
        data_dir=data_dir,
        nbd_host="127.0.0.1",
        nbd_port=0,
        redis_url=url,
        redis_prefix=keys.prefix,
        heartbeat_interval_s=0.1,
        heartbeat_ttl_s=5.0,
        reconcile_interval_s=30.0,
        settings=Settings(),
    )


class RunningDesk:
    """An OrderDesk running in a task until the test ends (or ``stop`` is called)."""

    def __init__(self, store: StateStore, data_dir: Path, runtime: ComponentRuntime) -> None:
        self.ledger = Ledger(data_dir)
        self.desk = OrderDesk(store, CACHE, runtime, self.ledger, reconcile_interval_s=30.0)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.ledger.load()
        self._task = asyncio.create_task(self.desk.run(self._stop))
        await self.desk.ready.wait()

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task


@contextlib.asynccontextmanager
async def running_desk(
    store: StateStore, data_dir: Path, runtime: ComponentRuntime
) -> AsyncIterator[RunningDesk]:
    desk = RunningDesk(store, data_dir, runtime)
    await desk.start()
    try:
        yield desk
    finally:
        await desk.stop()


def echo(data_dir: Path, redis_server: RedisServer, keys: Keys) -> EchoRuntime:
    return EchoRuntime(config_for(data_dir, redis_server.url, keys))


async def lease_for(store: StateStore, owner: str, resource: str = RESOURCE) -> Lease:
    lease = await Leases(store, owner, ttl_s=60).acquire(resource)
    assert lease is not None
    return lease


def open_order(lease: Lease, disk: str = "disk-1", **params: str | int) -> Order:
    return Order(disk, OrderAction.OPEN, "m-1", lease.token, lease.resource, params=params)


def cut_order(lease: Lease, request: int, disk: str = "disk-1") -> Order:
    return Order(disk, OrderAction.CUT_EPOCH, "m-1", lease.token, lease.resource, request)


async def expire_lease(redis: aioredis.Redis, keys: Keys, resource: str = RESOURCE) -> None:
    """Make a lease's time run out (as if its holder stopped renewing long ago)."""
    await redis.hset(keys.lease(resource), "expires", "0")


def test_an_order_round_trips_and_its_id_follows_its_content() -> None:
    order = Order("disk-1", OrderAction.OPEN, "m-1", 3, RESOURCE, params={"size": 5, "path": "/x"})
    assert Order.from_json(order.to_json()) == order
    assert Order.from_json(order.to_json()).order_id == order.order_id
    changed = Order("disk-1", OrderAction.OPEN, "m-1", 3, RESOURCE, params={"size": 6})
    assert changed.order_id != order.order_id
    tampered = json.loads(order.to_json()) | {"token": 4}
    with pytest.raises(ValueError, match="does not match"):
        Order.from_json(json.dumps(tampered))


async def test_an_order_given_twice_is_applied_once(
    store: StateStore, data_dir: Path, redis_server: RedisServer, keys: Keys
) -> None:
    lease = await lease_for(store, "ferry-a")
    orders = ComponentOrders(store, CACHE)
    async with running_desk(store, data_dir, echo(data_dir, redis_server, keys)):
        order = open_order(lease, path="/disks/d1")
        first = await orders.give_and_wait(order, WAIT_S)
        assert await orders.give(order) is False  # the same desired state: nothing changes
        again = await orders.wait(order, WAIT_S)
        assert first.kind is OutcomeKind.APPLIED and again == first
        cut = await orders.give_and_wait(cut_order(lease, 1), WAIT_S)
        assert cut.kind is OutcomeKind.APPLIED and cut.result["epoch"] == 1
    # A restarted component reads the same desired state and applies nothing again.
    async with running_desk(store, data_dir, echo(data_dir, redis_server, keys)) as desk:
        assert desk.desk.counts["applied"] == 0
        await orders.give(cut_order(lease, 2))
        second_cut = await orders.wait(cut_order(lease, 2), WAIT_S)
        assert second_cut.result["epoch"] == 2
    lines = applied_orders(data_dir)
    assert [(line["action"], line["epoch_request"]) for line in lines] == [
        ("open", 0),
        ("cut_epoch", 1),
        ("cut_epoch", 2),
    ]


async def test_the_script_refuses_an_order_with_a_lower_token_than_the_disk_holds(
    store: StateStore, redis: aioredis.Redis, keys: Keys
) -> None:
    orders = ComponentOrders(store, CACHE)
    for owner in ("ferry-a", "ferry-b"):  # the fence moves to 2
        await lease_for(store, owner)
        await expire_lease(redis, keys)
    newer = await lease_for(store, "ferry-c")
    assert newer.token == 3
    await orders.give(open_order(newer))
    older = await lease_for(store, "ferry-d", resource="group:other")
    assert older.token == 1
    with pytest.raises(StaleToken) as refused:
        await orders.give(open_order(older, size=1))
    assert (refused.value.token, refused.value.highest) == (1, 3)
    desired = await orders.desired("disk-1")
    assert desired is not None and desired.token == 3


async def test_the_component_refuses_a_stale_token_that_reaches_it_anyway(
    store: StateStore,
    redis: aioredis.Redis,
    data_dir: Path,
    redis_server: RedisServer,
    keys: Keys,
) -> None:
    """A desired state rolled back behind the script's back (a Redis restored from an old
    copy, a hand edit): the component's own ledger still refuses the lower token."""
    orders = ComponentOrders(store, CACHE)
    await lease_for(store, "ferry-a")
    await expire_lease(redis, keys)
    lease = await lease_for(store, "ferry-b")
    assert lease.token == 2
    async with running_desk(store, data_dir, echo(data_dir, redis_server, keys)):
        applied = await orders.give_and_wait(open_order(lease), WAIT_S)
        assert applied.kind is OutcomeKind.APPLIED
        stale = Order("disk-1", OrderAction.CLOSE, "m-1", 1, RESOURCE)
        await redis.hset(ComponentKeys(keys, CACHE).orders, "disk-1", stale.to_json())
        await redis.xadd(ComponentKeys(keys, CACHE).order_events, {"disk": "disk-1"})
        outcome = await orders.wait(stale, WAIT_S)
    assert outcome.kind is OutcomeKind.REFUSED and outcome.code is OutcomeCode.STALE_TOKEN
    assert [line["action"] for line in applied_orders(data_dir)] == ["open"]
    assert Ledger(data_dir).path.exists()


async def test_an_appliance_whose_lease_was_taken_over_cannot_give_an_order(
    store: StateStore, redis: aioredis.Redis, keys: Keys
) -> None:
    orders = ComponentOrders(store, CACHE)
    old = await lease_for(store, "ferry-a")
    await orders.give(open_order(old))
    await expire_lease(redis, keys)
    with pytest.raises(LeaseLost):  # expired, not yet taken over: no order either
        await orders.give(cut_order(old, 1))
    new = await lease_for(store, "ferry-b")
    assert new.token > old.token
    with pytest.raises(LeaseLost):
        await orders.give(cut_order(old, 1))
    assert await orders.give(cut_order(new, 1)) is True
    desired = await orders.desired("disk-1")
    assert desired == cut_order(new, 1)


async def test_an_invalid_order_is_refused_not_applied(
    store: StateStore, redis: aioredis.Redis, data_dir: Path, keys: Keys
) -> None:
    component = ComponentKeys(keys, CACHE)
    await redis.hset(component.orders, "disk-9", b'{"action": "format everything"}')
    async with running_desk(store, data_dir, UnavailableRuntime("cache", "unused")):
        outcome = await ComponentOrders(store, CACHE).outcome("disk-9")
    assert outcome is not None
    assert (outcome.kind, outcome.code) == (OutcomeKind.REFUSED, OutcomeCode.INVALID)


async def test_a_kind_without_a_core_answers_not_implemented(
    store: StateStore, data_dir: Path, redis_server: RedisServer, keys: Keys
) -> None:
    factory = runtime_for_kind("nosuchcore")
    runtime = factory(config_for(data_dir, redis_server.url, keys))
    lease = await lease_for(store, "ferry-a")
    async with runtime as core, running_desk(store, data_dir, core):
        outcome = await ComponentOrders(store, CACHE).give_and_wait(open_order(lease), WAIT_S)
    assert outcome.kind is OutcomeKind.NOT_IMPLEMENTED
    assert "appliance.components.nosuchcore" in outcome.reason


def test_a_runtime_named_on_the_command_line_needs_test_mode() -> None:
    with pytest.raises(NotConfigured):
        runtime_by_name("tests.support.echo:EchoRuntime", test_mode=False)
    assert runtime_by_name("tests.support.echo:EchoRuntime", test_mode=True) is EchoRuntime


async def test_waiting_for_a_component_that_never_answers_is_bounded(store: StateStore) -> None:
    lease = await lease_for(store, "ferry-a")
    orders = ComponentOrders(store, CACHE)
    with pytest.raises(ComponentSilent) as silent:
        await orders.give_and_wait(open_order(lease), 0.3)
    assert silent.value.instance == "cache/cache-1"


async def test_heartbeat_carries_figures_and_silence_means_failed(
    store: StateStore, data_dir: Path, redis_server: RedisServer, keys: Keys
) -> None:
    runtime = echo(data_dir, redis_server, keys)
    writer = HeartbeatWriter(store, CACHE, runtime.status, interval_s=60, ttl_s=30)
    health = ComponentHealth(store, timeout_s=0.3)
    assert (await health.report(CACHE)).liveness is Liveness.FAILED  # never seen
    await writer.beat()
    report = await health.report(CACHE)
    assert report.liveness is Liveness.OK and report.sequence == 0
    assert report.figures["committed_epoch"] == {} and report.figures["dirty_bytes"] == 0
    failed = await health.wait_until(CACHE, lambda r: r.failed, within_s=WAIT_S)
    assert failed.silent_s is not None and failed.silent_s > 0.3
    waiting = asyncio.create_task(health.wait_until(CACHE, lambda r: not r.failed, WAIT_S))
    await writer.beat()
    assert (await waiting).sequence == 1


async def test_a_component_rides_out_a_redis_restart(tmp_path: Path, data_dir: Path) -> None:
    """Redis goes away under a running desk and comes back: orders given afterwards are
    applied (the desk retries at its edge, then re-reads everything)."""
    keys = Keys("outage")
    server = RedisServer(tmp_path / "redis")
    await server.start()
    store = StateStore(connect(server.url), keys, retry_seconds=0.3, retry_attempts=2)
    runtime = EchoRuntime(config_for(data_dir, server.url, keys))
    try:
        async with running_desk(store, data_dir, runtime):
            server.kill()
            server = RedisServer(tmp_path / "redis", port=server.port)
            await server.start()
            lease = await lease_for(store, "ferry-a")
            outcome = await ComponentOrders(store, CACHE).give_and_wait(open_order(lease), WAIT_S)
        assert outcome.kind is OutcomeKind.APPLIED
        assert [line["action"] for line in applied_orders(data_dir)] == ["open"]
    finally:
        await store.close()
        await server.stop()


async def test_waiting_for_an_order_replaced_before_it_was_carried_out_says_so(
    store: StateStore,
) -> None:
    lease = await lease_for(store, "ferry-a")
    orders = ComponentOrders(store, CACHE)
    first, second = cut_order(lease, 1), cut_order(lease, 2)
    await orders.give(first)
    await orders.give(second)  # no component ran in between: the first is never carried out
    with pytest.raises(OrderRefused) as replaced:
        await orders.wait(first, WAIT_S)
    assert second.order_id in replaced.value.reason
