"""Leases with fencing tokens against a real redis-server: one owner at a time, stale owners out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from appliance.embedded import RedisServer, free_port
from appliance.errors import FencedOut, LeaseLost
from appliance.state.checkpoints import RedisCheckpointStore
from appliance.state.keys import Keys
from appliance.state.leases import Lease, LeaseKeeper, Leases
from appliance.state.store import StateStore, connect
from tests.support.redisfields import field_int

TTL_S = 30.0
"""Generous: no test waits for a lease to run out. Redis's clock is real, so a test that
needs an expired lease expires it by hand (``expire_now``) instead of sleeping past it."""
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


async def expire_now(redis: aioredis.Redis, keys: Keys, resource: str = RESOURCE) -> None:
    """The lease's time is up (as Redis's clock would have it some seconds from now)."""
    await redis.hset(keys.lease(resource), "expires", 0)


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


async def test_a_second_owner_waits_for_expiry(
    store: StateStore, redis: aioredis.Redis, keys: Keys
) -> None:
    a, b = leases_of(store, "ferry-a"), leases_of(store, "ferry-b")
    first = await a.acquire(RESOURCE)
    assert first is not None
    assert await b.acquire(RESOURCE) is None
    await expire_now(redis, keys)
    second = await b.acquire(RESOURCE)
    assert second is not None and second.owner == "ferry-b"
    assert second.token > first.token
    assert await a.holder(RESOURCE) == "ferry-b"


async def test_the_lease_key_expires_in_redis_but_the_fence_never_does(
    store: StateStore, redis: aioredis.Redis, keys: Keys
) -> None:
    a = leases_of(store, "ferry-a", ttl_s=20)
    lease = await a.acquire(RESOURCE)
    assert lease is not None
    # A crashed owner's lease key vanishes by itself...
    assert 0 < await redis.pttl(keys.lease(RESOURCE)) <= 20_000
    # ...while the fence keeps counting, so the next owner's token is still larger.
    assert await redis.pttl(keys.fence(RESOURCE)) == -1
    await redis.delete(keys.lease(RESOURCE))  # what Redis does when the TTL runs out
    taken = await leases_of(store, "ferry-b").acquire(RESOURCE)
    assert taken is not None and taken.token == lease.token + 1


async def test_a_fence_counter_left_by_an_older_version_keeps_counting(
    store: StateStore, redis: aioredis.Redis, keys: Keys
) -> None:
    await redis.set(keys.fence(RESOURCE), 41)  # it used to be a plain INCR counter
    lease = await leases_of(store, "ferry-a").acquire(RESOURCE)
    assert lease is not None and lease.token == 42


async def test_renewal_gives_the_lease_a_whole_ttl_again(
    store: StateStore, redis: aioredis.Redis, keys: Keys
) -> None:
    a, b = leases_of(store, "ferry-a", ttl_s=20), leases_of(store, "ferry-b")
    lease = await a.acquire(RESOURCE)
    assert lease is not None
    key = keys.lease(RESOURCE)
    await redis.pexpire(key, 500)  # almost run out...
    expires = await field_int(redis, key, "expires")
    assert await a.renew(lease)
    assert await redis.pttl(key) > 10_000  # ...and good for another ttl
    assert await field_int(redis, key, "expires") >= expires
    assert await b.acquire(RESOURCE) is None


async def test_the_fencing_token_grows_every_time_the_lease_changes_hands(
    store: StateStore, redis: aioredis.Redis, keys: Keys
) -> None:
    owners = [leases_of(store, f"ferry-{n}") for n in range(3)]
    tokens = []
    for round_ in range(6):
        leases = owners[round_ % 3]
        lease = await leases.acquire(RESOURCE)
        assert lease is not None
        tokens.append(lease.token)
        if round_ % 2:
            await leases.release(lease)  # handed back...
        else:
            await expire_now(redis, keys)  # ...or left to expire
    assert tokens == sorted(set(tokens)), tokens
    # The same owner coming back after expiry is a change of hands too.
    a = owners[0]
    old = await a.acquire(RESOURCE)
    assert old is not None
    await expire_now(redis, keys)
    new = await a.acquire(RESOURCE)
    assert new is not None and new.token > old.token


async def test_a_stale_token_can_neither_renew_nor_release(
    store: StateStore, redis: aioredis.Redis, keys: Keys
) -> None:
    a, b = leases_of(store, "ferry-a"), leases_of(store, "ferry-b")
    stale = await a.acquire(RESOURCE)
    assert stale is not None
    await expire_now(redis, keys)
    assert not await a.renew(stale)  # expired, nobody else holds it yet: still refused
    current = await b.acquire(RESOURCE)
    assert current is not None
    assert not await a.renew(stale)
    await a.release(stale)
    assert await a.holder(RESOURCE) == "ferry-b"
    assert await b.renew(current)


async def test_release_frees_the_lease_at_once(store: StateStore) -> None:
    a, b = leases_of(store, "ferry-a"), leases_of(store, "ferry-b")
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

KEEPER_TTL_S = 3.0
"""Renewals every second: quick tests, and a stalled machine has two seconds to spare."""


class Work:
    """Work that runs until the test lets it finish, and says how it ended."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.finish = asyncio.Event()
        self.cancelled = False
        self.finished = False

    async def __call__(self) -> None:
        self.started.set()
        try:
            await self.finish.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        self.finished = True


class WatchedLeases(Leases):
    """Real leases that tell the test when they renewed, and can hold a renewal's answer."""

    def __init__(self, store: StateStore, owner: str, ttl_s: float) -> None:
        super().__init__(store, owner, ttl_s)
        self.renewed = asyncio.Event()
        self.answer = asyncio.Event()
        self.answer.set()

    async def renew(self, lease: Lease) -> bool:
        renewed = await super().renew(lease)
        await self.answer.wait()
        if renewed:
            self.renewed.set()
        return renewed


async def test_the_keeper_renews_while_the_work_runs(store: StateStore) -> None:
    a, b = WatchedLeases(store, "ferry-a", KEEPER_TTL_S), leases_of(store, "ferry-b")
    lease = await a.acquire(RESOURCE)
    assert lease is not None
    work = Work()
    keeper = asyncio.create_task(LeaseKeeper(a, lease).run(work))
    await asyncio.wait_for(a.renewed.wait(), timeout=30)
    work.finish.set()
    await asyncio.wait_for(keeper, timeout=30)
    assert work.finished and not work.cancelled and not lease.lost
    assert await b.acquire(RESOURCE) is None  # renewed, so still ours
    assert await a.renew(lease)


async def test_the_keeper_cancels_the_work_when_the_lease_is_taken_away(
    store: StateStore, redis: aioredis.Redis, keys: Keys
) -> None:
    a = leases_of(store, "ferry-a", KEEPER_TTL_S)
    lease = await a.acquire(RESOURCE)
    assert lease is not None
    work = Work()
    keeper = asyncio.create_task(LeaseKeeper(a, lease).run(work))
    await work.started.wait()
    await redis.delete(keys.lease(RESOURCE))
    with pytest.raises(LeaseLost) as raised:
        await asyncio.wait_for(keeper, timeout=30)  # at the next renewal, ttl/3 from now
    assert work.cancelled and not work.finished
    assert lease.lost
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
        keeper = LeaseKeeper(leases_of(nowhere, "ferry-a", KEEPER_TTL_S), lease)
        with pytest.raises(LeaseLost):
            await asyncio.wait_for(keeper.run(work), 30)
        assert work.cancelled and lease.lost
    finally:
        await nowhere.close()


async def test_a_renewal_answered_too_late_is_a_lost_lease(store: StateStore) -> None:
    """Redis may say yes after the lease ran out: by then another owner may have it."""
    a = WatchedLeases(store, "ferry-a", KEEPER_TTL_S)
    lease = await a.acquire(RESOURCE)
    assert lease is not None
    a.answer.clear()  # the first renewal's answer never arrives in time
    work = Work()
    with pytest.raises(LeaseLost):
        await asyncio.wait_for(LeaseKeeper(a, lease).run(work), 30)
    assert work.cancelled and lease.lost
    assert not a.renewed.is_set()


async def test_a_refused_fenced_write_stops_the_work_at_once(
    store: StateStore, redis: aioredis.Redis, keys: Keys
) -> None:
    """No waiting for the next renewal (10 s away here): the refusal itself stops the work."""
    a = leases_of(store, "ferry-a")
    lease = await a.acquire(RESOURCE)
    assert lease is not None
    work = Work()
    keeper = asyncio.create_task(LeaseKeeper(a, lease).run(work))
    await work.started.wait()
    await expire_now(redis, keys)
    taken = await leases_of(store, "ferry-b").acquire(RESOURCE)
    assert taken is not None
    checkpoint = RedisCheckpointStore(redis, keys, "t-1", lease=lease)
    with pytest.raises(FencedOut):
        await checkpoint.mark_durable(7)
    with pytest.raises(LeaseLost):
        await asyncio.wait_for(keeper, timeout=5)
    assert work.cancelled and lease.lost
    # Refused in Redis once; after that this owner does not even ask.
    with pytest.raises(FencedOut):
        await checkpoint.mark_durable(8)
    fence = await redis.hgetall(keys.fence(RESOURCE))
    assert fence[f"refused:{lease.token}".encode()] == b"1"
    assert await redis.exists(keys.checkpoint("t-1")) == 0


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
    assert work.cancelled and not lease.lost
    assert await a.renew(lease)  # nobody took it: the lease itself is intact
