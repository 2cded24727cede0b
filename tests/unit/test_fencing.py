"""Fenced everywhere: once a migration's lease moved on, nothing its old owner writes lands.

Against a real redis-server. Redis's clock is real, so leases are generous and a
test that needs one to have run out expires it by hand.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from appliance.datapath.transfer import Transfer
from appliance.embedded import RedisServer
from appliance.errors import FencedOut, LeaseLost
from appliance.state.checkpoints import CheckpointMeta, ChunkRecord, RedisCheckpointStore
from appliance.state.events import EventLog, encode_entry
from appliance.state.keys import Keys
from appliance.state.leases import Lease, LeaseKeeper, Leases
from appliance.state.migrations import MigrationStore, NewMigration
from appliance.state.store import StateStore, connect
from tests.unit.test_transfer import FaultyBackend, options, source_disk

RESOURCE = "group:g-1"
META = CheckpointMeta(size=4 << 20, chunk_size=1 << 20, hash_name="xxh3-128")


@pytest.fixture
async def store(
    redis: aioredis.Redis, redis_server: RedisServer, keys: Keys
) -> AsyncIterator[StateStore]:
    # ``redis`` (the fixture) deletes this test's keys afterwards.
    store = StateStore(connect(redis_server.url), keys, retry_seconds=0.5, retry_attempts=2)
    yield store
    await store.close()


async def owner(store: StateStore, name: str, ttl_s: float = 30.0) -> Lease:
    lease = await Leases(store, name, ttl_s).acquire(RESOURCE)
    assert lease is not None
    return lease


async def take_over(store: StateStore, redis: aioredis.Redis, keys: Keys) -> Lease:
    """The current owner stalls past its lease (expired by hand) and ferry-b takes over."""
    await redis.hset(keys.lease(RESOURCE), "expires", 0)
    return await owner(store, "ferry-b")


def as_it_was(lease: Lease) -> Lease:
    """The stale owner's lease as a process would hold it that has not heard of any loss."""
    return Lease(lease.resource, lease.owner, lease.token)


async def fence_counts(redis: aioredis.Redis, keys: Keys, token: int) -> tuple[int, int]:
    fence = await redis.hgetall(keys.fence(RESOURCE))
    return (
        int(fence.get(f"accepted:{token}".encode(), 0)),
        int(fence.get(f"refused:{token}".encode(), 0)),
    )


# --- checkpoints ------------------------------------------------------------------------


async def test_a_stale_owner_s_checkpoint_writes_are_all_refused(
    store: StateStore, redis: aioredis.Redis, keys: Keys
) -> None:
    old = await owner(store, "ferry-a")
    mine = RedisCheckpointStore(redis, keys, "t-1", lease=old)
    await mine.begin(META)
    await mine.record([ChunkRecord(0, 1, b"\x01" * 16), ChunkRecord(1, 1, None)])
    await mine.mark_durable(1)
    before = await redis.hgetall(keys.checkpoint("t-1"))
    new = await take_over(store, redis, keys)

    attempts = {
        "begin": lambda s: s.begin(META),
        "record": lambda s: s.record([ChunkRecord(2, 2, b"\x02" * 16)]),
        "forget": lambda s: s.forget([0]),
        "mark_durable": lambda s: s.mark_durable(2),
        "mark_complete": lambda s: s.mark_complete(b"\x03" * 16),
        "delete": lambda s: s.delete(),
    }
    for name, attempt in attempts.items():
        stale = RedisCheckpointStore(redis, keys, "t-1", lease=as_it_was(old))
        with pytest.raises(FencedOut):
            await attempt(stale)
        assert await redis.hgetall(keys.checkpoint("t-1")) == before, name
    assert await fence_counts(redis, keys, old.token) == (3, len(attempts))

    # The new owner carries on from the same checkpoint.
    theirs = RedisCheckpointStore(redis, keys, "t-1", lease=new)
    checkpoint = await theirs.load()
    assert checkpoint is not None and checkpoint.durable_round == 1
    await theirs.mark_durable(2)
    assert await redis.hget(keys.checkpoint("t-1"), "durable") == b"2"


async def test_a_lease_known_lost_refuses_before_asking_redis(
    store: StateStore, redis: aioredis.Redis, keys: Keys
) -> None:
    lease = await owner(store, "ferry-a")
    lease.mark_lost()  # the keeper's renewal failed: the owner stops, Redis or not
    with pytest.raises(FencedOut):
        await RedisCheckpointStore(redis, keys, "t-1", lease=lease).begin(META)
    assert await redis.exists(keys.checkpoint("t-1")) == 0
    assert await fence_counts(redis, keys, lease.token) == (0, 0)


async def test_an_expired_lease_that_nobody_took_still_cannot_write(
    store: StateStore, redis: aioredis.Redis, keys: Keys
) -> None:
    lease = await owner(store, "ferry-a")
    await redis.hset(keys.lease(RESOURCE), "expires", 0)
    with pytest.raises(FencedOut):
        await RedisCheckpointStore(redis, keys, "t-1", lease=lease).begin(META)
    assert lease.lost


async def test_a_checkpoint_without_a_lease_is_not_fenced(
    redis: aioredis.Redis, keys: Keys
) -> None:
    """Transfers nobody owns (tests, benches, a one-off copy) keep working unfenced."""
    free = RedisCheckpointStore(redis, keys, "t-free")
    await free.begin(META)
    await free.record([ChunkRecord(index, 1, None) for index in range(2500)])  # > one batch
    await free.forget(list(range(1000, 2500)))
    await free.mark_durable(1)
    checkpoint = await free.load()
    assert checkpoint is not None and len(checkpoint.records) == 1000
    assert checkpoint.durable_round == 1


# --- records, events, locks, secrets -----------------------------------------------------


async def test_a_step_and_its_event_land_together_or_not_at_all(
    store: StateStore, redis: aioredis.Redis, keys: Keys
) -> None:
    migrations, events = MigrationStore(store), EventLog(store)
    record = json.dumps({"step": "queued"})
    await migrations.create_group(
        "g-1", "req-1", 1, [NewMigration("m-1", "queued", "queued", record)]
    )
    old = await owner(store, "ferry-a")

    async def advance(lease: Lease, expected: str, step: str) -> None:
        event = encode_entry("step", "now", "m-1", {"step": step, "previous": expected})
        await migrations.transition(
            "m-1",
            expected=expected,
            step=step,
            old_public="queued" if expected == "queued" else "running",
            public="running",
            record=json.dumps({"step": step}),
            lease=lease,
            event=event,
        )

    await advance(old, "queued", "preparing")
    new = await take_over(store, redis, keys)
    with pytest.raises(FencedOut):
        await advance(as_it_was(old), "preparing", "powering_off")
    await advance(new, "preparing", "powering_off")

    stored = await migrations.get("m-1")
    assert stored is not None and stored.step == "powering_off"
    for log in (await events.read("m-1"), await events.read()):
        assert [(e.kind, e.fields["step"]) for e in log] == [
            ("step", "preparing"),
            ("step", "powering_off"),
        ]


async def test_a_stale_owner_can_neither_unlock_the_vm_nor_drop_the_secret(
    store: StateStore, redis: aioredis.Redis, keys: Keys
) -> None:
    migrations = MigrationStore(store)
    await migrations.lock_vm("onprem", "vm-1", "m-1", pending_s=60, finished=())
    await redis.set(keys.secret("m-1"), "sealed")
    old = await owner(store, "ferry-a")
    new = await take_over(store, redis, keys)

    with pytest.raises(FencedOut):
        await migrations.unlock_vm("onprem", "vm-1", "m-1", as_it_was(old))
    with pytest.raises(FencedOut):
        await migrations.delete_secret("m-1", as_it_was(old))
    assert await migrations.lock_holder("onprem", "vm-1") == "m-1"
    assert await redis.get(keys.secret("m-1")) == b"sealed"

    await migrations.unlock_vm("onprem", "vm-1", "m-1", new)
    await migrations.delete_secret("m-1", new)
    assert await migrations.lock_holder("onprem", "vm-1") is None
    assert await redis.exists(keys.secret("m-1")) == 0


# --- a transfer under a keeper -------------------------------------------------------------


class WatchedCheckpoint(RedisCheckpointStore):
    """Says when a durable mark has landed in Redis."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.durable = asyncio.Event()

    async def mark_durable(self, flush_round: int) -> None:
        await super().mark_durable(flush_round)
        self.durable.set()


async def test_a_transfer_stops_at_once_when_its_lease_moves_on_and_writes_nothing_after(
    store: StateStore, redis: aioredis.Redis, keys: Keys
) -> None:
    """The owner stalls mid-copy with a durable checkpoint; another process takes over.

    Before fencing, the old owner's flush loop and its last sync kept writing the
    checkpoint (for up to 15 s) over the new owner's.
    """
    leases = Leases(store, "ferry-a", 30.0)  # the next renewal is 10 s away: not the stop
    lease = await leases.acquire(RESOURCE)
    assert lease is not None
    stalled, never = asyncio.Event(), asyncio.Event()
    writes = 0

    async def link(offset: int, data: bytes) -> bytes:
        nonlocal writes
        writes += 1
        if writes > 8:  # mid-copy, the link stalls for good
            stalled.set()
            await never.wait()
        return data

    source = await source_disk(size=64 * 64 * 1024)
    target = FaultyBackend(source.size, link)
    checkpoints = WatchedCheckpoint(redis, keys, "t-1", lease=lease)
    transfer = Transfer(
        "t-1", source, target, checkpoints=checkpoints, options=options(flush_interval_s=0.05)
    )

    async def work() -> None:
        await transfer.run()

    keeper = asyncio.create_task(LeaseKeeper(leases, lease).run(work))
    await stalled.wait()
    await checkpoints.durable.wait()  # the flush loop runs every 50 ms, stalled link or not
    await take_over(store, redis, keys)
    taken_over = await redis.hgetall(keys.checkpoint("t-1"))
    accepted, _ = await fence_counts(redis, keys, lease.token)

    with pytest.raises(LeaseLost):
        await asyncio.wait_for(keeper, timeout=5)
    assert lease.lost
    assert await redis.hgetall(keys.checkpoint("t-1")) == taken_over
    assert (await fence_counts(redis, keys, lease.token))[0] == accepted
