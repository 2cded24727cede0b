"""Leases with fencing tokens against a real redis-server: one owner at a time, stale owners out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from appliance.embedded import RedisServer, free_port
from appliance.errors import LeaseLost
from appliance.state.keys import Keys
from appliance.state.leases import Lease, LeaseKeeper, Leases
from appliance.state.store import StateStore, connect

TTL_S = 0.3
RESOURCE = "group:g-1"


@pytest.fixture
async def store(
    redis: aioredis.Redis, redis_server: RedisServer, keys: Keys
) -> AsyncIterator[StateStore]:
    # ``redis`` (the fixture) deletes this test's keys afterwards.
    store = StateStore(connect(redis_server.url), keys, retry_seconds=0.5, retry_attempts=2)
    yield store
    await store.close()


def leases_of(store: StateStore, owner: str, ttl_s: float = TTL_S) -> Leases:
    return Leases(store, owner, ttl_s)


async def test_acquire_gives_a_token_and_the_holder_is_known(store: StateStore) -> None:
    lease = await leases_of(store, "ferry-a").acquire(RESOURCE)
    assert lease == Lease(RESOURCE, "ferry-a", 1)
    assert await leases_of(store, "ferry-b").holder(RESOURCE) == "ferry-a"
    assert await leases_of(store, "ferry-b").holder("group:other") is None


async def test_the_owner_acquiring_again_keeps_its_token(store: StateStore) -> None:
    a = leases_of(store, "ferry-a")
    first = await a.acquire(RESOURCE)
    again = await a.acquire(RESOURCE)
    assert first is not None and again == first


async def test_a_second_owner_waits_for_expiry(store: StateStore) -> None:
    a, b = leases_of(store, "ferry-a"), leases_of(store, "ferry-b")
    first = await a.acquire(RESOURCE)
    assert first is not None
    assert await b.acquire(RESOURCE) is None
    await asyncio.sleep(TTL_S + 0.1)
    second = await b.acquire(RESOURCE)
    assert second is not None and second.owner == "ferry-b"
    assert second.token > first.token
    assert await a.holder(RESOURCE) == "ferry-b"


async def test_renewal_keeps_a_lease_past_its_ttl(store: StateStore) -> None:
    a, b = leases_of(store, "ferry-a"), leases_of(store, "ferry-b")
    lease = await a.acquire(RESOURCE)
    assert lease is not None
    for _ in range(4):  # 4 x 0.15 s = twice the ttl
        await asyncio.sleep(TTL_S / 2)
        assert await a.renew(lease)
    assert await b.acquire(RESOURCE) is None


async def test_the_fencing_token_grows_every_time_the_lease_changes_hands(
    store: StateStore,
) -> None:
    owners = [leases_of(store, f"ferry-{n}", ttl_s=0.1) for n in range(3)]
    tokens = []
    for round_ in range(6):
        leases = owners[round_ % 3]
        lease = await leases.acquire(RESOURCE)
        assert lease is not None
        tokens.append(lease.token)
        if round_ % 2:
            await leases.release(lease)  # handed back...
        else:
            await asyncio.sleep(0.15)  # ...or left to expire
    assert tokens == sorted(set(tokens)), tokens
    # The same owner coming back after expiry is a change of hands too.
    a = owners[0]
    old = await a.acquire(RESOURCE)
    assert old is not None
    await asyncio.sleep(0.15)
    new = await a.acquire(RESOURCE)
    assert new is not None and new.token > old.token


async def test_a_stale_token_can_neither_renew_nor_release(store: StateStore) -> None:
    a, b = leases_of(store, "ferry-a"), leases_of(store, "ferry-b")
    stale = await a.acquire(RESOURCE)
    assert stale is not None
    await asyncio.sleep(TTL_S + 0.1)
    assert not await a.renew(stale)  # expired, nobody else holds it yet: still refused
    current = await b.acquire(RESOURCE)
    assert current is not None
    assert not await a.renew(stale)
    await a.release(stale)
    assert await a.holder(RESOURCE) == "ferry-b"
    assert await b.renew(current)


async def test_release_frees_the_lease_at_once(store: StateStore) -> None:
    a, b = leases_of(store, "ferry-a", ttl_s=60), leases_of(store, "ferry-b", ttl_s=60)
    lease = await a.acquire(RESOURCE)
    assert lease is not None
    await a.release(lease)
    assert await a.holder(RESOURCE) is None
    taken = await b.acquire(RESOURCE)
    assert taken is not None and taken.token > lease.token
    assert not await a.renew(lease)


async def test_leases_on_different_resources_are_independent(store: StateStore) -> None:
    a, b = leases_of(store, "ferry-a"), leases_of(store, "ferry-b")
    assert await a.acquire("group:one") is not None
    taken = await b.acquire("group:two")
    assert taken is not None and taken.token == 1


# --- LeaseKeeper ----------------------------------------------------------------


class Work:
    """Work that runs until told otherwise, and says how it ended."""

    def __init__(self, seconds: float = 30.0) -> None:
        self.seconds = seconds
        self.started = asyncio.Event()
        self.cancelled = False
        self.finished = False

    async def __call__(self) -> None:
        self.started.set()
        try:
            await asyncio.sleep(self.seconds)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        self.finished = True


async def test_the_keeper_renews_while_the_work_runs(store: StateStore) -> None:
    a, b = leases_of(store, "ferry-a"), leases_of(store, "ferry-b")
    lease = await a.acquire(RESOURCE)
    assert lease is not None
    work = Work(seconds=4 * TTL_S)
    await LeaseKeeper(a, lease).run(work)
    assert work.finished and not work.cancelled
    assert await b.acquire(RESOURCE) is None  # renewed until the end, so still ours
    assert await a.renew(lease)


async def test_the_keeper_cancels_the_work_when_the_lease_is_taken_away(
    store: StateStore, redis: aioredis.Redis, keys: Keys
) -> None:
    a = leases_of(store, "ferry-a")
    lease = await a.acquire(RESOURCE)
    assert lease is not None
    work = Work()
    keeper = asyncio.create_task(LeaseKeeper(a, lease).run(work))
    await work.started.wait()
    await redis.delete(keys.lease(RESOURCE))
    started = asyncio.get_running_loop().time()
    with pytest.raises(LeaseLost) as raised:
        await asyncio.wait_for(keeper, timeout=5)
    # Stopped at the next renewal (every ttl/3), well before the work's 30 s.
    assert asyncio.get_running_loop().time() - started < TTL_S + 0.5
    assert work.cancelled and not work.finished
    assert raised.value.resource == RESOURCE and raised.value.token == lease.token


async def test_the_keeper_treats_an_unreachable_store_as_a_lost_lease(
    store: StateStore, keys: Keys
) -> None:
    lease = await leases_of(store, "ferry-a").acquire(RESOURCE)
    assert lease is not None
    nowhere = StateStore(
        connect(f"redis://127.0.0.1:{free_port()}/0"), keys, retry_seconds=0.2, retry_attempts=2
    )
    try:
        work = Work()
        with pytest.raises(LeaseLost):
            await asyncio.wait_for(LeaseKeeper(leases_of(nowhere, "ferry-a"), lease).run(work), 5)
        assert work.cancelled
    finally:
        await nowhere.close()


async def test_the_work_s_own_error_goes_through_the_keeper(store: StateStore) -> None:
    a = leases_of(store, "ferry-a")
    lease = await a.acquire(RESOURCE)
    assert lease is not None

    async def broken() -> None:
        raise RuntimeError("the work failed")

    with pytest.raises(RuntimeError, match="the work failed"):
        await LeaseKeeper(a, lease).run(broken)


async def test_cancelling_the_keeper_from_outside_is_not_a_lost_lease(store: StateStore) -> None:
    a = leases_of(store, "ferry-a")
    lease = await a.acquire(RESOURCE)
    assert lease is not None
    work = Work()
    keeper = asyncio.create_task(LeaseKeeper(a, lease).run(work))
    await work.started.wait()
    keeper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await keeper
    assert work.cancelled
    assert await a.renew(lease)  # nobody took it: the lease itself is intact
