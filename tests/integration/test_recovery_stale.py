"""Stale outcomes: a component paused while carrying out an order, resumed after a newer
owner gave the disk another order (a higher token), records nothing of the old one.

The order desk runs in-process over a runtime held at a gate, against the real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from appliance.components.control import ComponentOrders, OrderDesk
from appliance.components.ledger import Ledger
from appliance.components.orders import ComponentKeys, Order, OrderOutcome
from appliance.embedded import RedisServer
from appliance.state.keys import Keys
from appliance.state.leases import Leases
from appliance.state.store import StateStore, connect, text
from tests.support.echo import applied_orders
from tests.unit.test_component_control import CACHE, RESOURCE, cut_order, echo, expire_lease


class HeldRuntime:
    """The echo runtime, each order held until the test lets it go (a paused process)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.entered = asyncio.Event()
        self.go = asyncio.Event()

    async def apply(self, order: Order) -> OrderOutcome:
        self.entered.set()
        await self.go.wait()
        outcome: OrderOutcome = await self._inner.apply(order)
        return outcome

    def status(self) -> Mapping[str, object]:
        status: Mapping[str, object] = self._inner.status()
        return status


@pytest.fixture
async def store(
    redis: aioredis.Redis, redis_server: RedisServer, keys: Keys
) -> AsyncIterator[StateStore]:
    store = StateStore(connect(redis_server.url), keys)
    yield store
    await store.close()


async def test_an_outcome_answering_an_order_a_newer_owner_replaced_is_refused(
    store: StateStore, data_dir: Path, redis_server: RedisServer, keys: Keys, redis: aioredis.Redis
) -> None:
    runtime = HeldRuntime(echo(data_dir, redis_server, keys))
    ledger = Ledger(data_dir)
    await ledger.load()
    desk = OrderDesk(store, CACHE, runtime, ledger, reconcile_interval_s=30.0)
    stop = asyncio.Event()
    task = asyncio.create_task(desk.run(stop))
    orders = ComponentOrders(store, CACHE)
    component_keys = ComponentKeys(keys, CACHE)
    try:
        await desk.ready.wait()
        old = await Leases(store, "appliance-a", ttl_s=60).acquire(RESOURCE)
        assert old is not None
        first = cut_order(old, 1)
        await orders.give(first)
        await asyncio.wait_for(runtime.entered.wait(), 10)  # carrying it out: held there

        # Meanwhile the old owner's lease ran out; a new owner gives the disk a new order.
        await expire_lease(redis, keys)
        new = await Leases(store, "appliance-b", ttl_s=60).acquire(RESOURCE)
        assert new is not None and new.token > old.token
        second = cut_order(new, 2)
        await orders.give(second)

        runtime.go.set()  # resumed: the first order's outcome is stale
        outcome = await orders.wait(second, 10)
        assert outcome.order_id == second.order_id and outcome.token == new.token
        refused = await redis.hget(component_keys.outcomes_refused, "disk-1")
        assert refused is not None and int(text(refused)) == 1
        assert desk.stale_outcomes == 1
        events: Any = await redis.xrange(component_keys.outcome_events)
        recorded = {text(fields[b"order_id"]) for _, fields in events}
        assert first.order_id not in recorded and second.order_id in recorded
        # The runtime did carry the first one out (it was under way): only its word is refused.
        assert [line["order_id"] for line in applied_orders(data_dir)] == [
            first.order_id,
            second.order_id,
        ]
    finally:
        runtime.go.set()
        stop.set()
        await task
