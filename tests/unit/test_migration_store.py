"""MigrationStore against a real redis-server: groups, fenced compare-and-set, counts, VM locks."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from appliance.embedded import RedisServer
from appliance.errors import IncorrectState, LeaseLost
from appliance.state.keys import Keys
from appliance.state.leases import Lease, Leases
from appliance.state.migrations import GroupInfo, MigrationStore, NewMigration
from appliance.state.store import StateStore, connect

GROUP = "g-1"
LEASE = f"group:{GROUP}"


@pytest.fixture
async def store(
    redis: aioredis.Redis, redis_server: RedisServer, keys: Keys
) -> AsyncIterator[StateStore]:
    # ``redis`` (the fixture) deletes this test's keys afterwards.
    store = StateStore(connect(redis_server.url), keys, retry_seconds=0.5, retry_attempts=2)
    yield store
    await store.close()


@pytest.fixture
def migrations(store: StateStore) -> MigrationStore:
    return MigrationStore(store)


def new(migration_id: str, note: str = "") -> NewMigration:
    return NewMigration(
        migration_id, "queued", "queued", json.dumps({"id": migration_id, "n": note})
    )


async def make_group(
    migrations: MigrationStore, group_id: str, *ids: str, request_id: str = "req-1"
) -> int:
    admission = await migrations.next_admission()
    await migrations.create_group(group_id, request_id, admission, [new(i) for i in ids])
    return admission


async def lease_for(store: StateStore, owner: str = "ferry-a", ttl_s: float = 30.0) -> Lease:
    lease = await Leases(store, owner, ttl_s).acquire(LEASE)
    assert lease is not None
    return lease


async def move(
    migrations: MigrationStore,
    migration_id: str,
    lease: Lease | None,
    expected: str,
    step: str,
    old_public: str,
    public: str,
) -> None:
    await migrations.transition(
        migration_id,
        expected=expected,
        step=step,
        old_public=old_public,
        public=public,
        record=json.dumps({"id": migration_id, "step": step}),
        lease=lease,
    )


# --- creating and reading ----------------------------------------------------------


async def test_a_group_and_its_members_are_created_together(migrations: MigrationStore) -> None:
    admission = await make_group(migrations, GROUP, "m-1", "m-2", request_id="req-7")

    one = await migrations.get("m-1")
    assert one is not None
    assert (one.step, one.public, one.cancel_requested) == ("queued", "queued", False)
    assert json.loads(one.record)["id"] == "m-1"
    assert await migrations.group(GROUP) == GroupInfo(GROUP, "req-7", ("m-1", "m-2"), admission)
    assert await migrations.active_groups() == [GROUP]
    assert await migrations.counts() == {"queued": 2}
    assert await migrations.get("m-unknown") is None
    assert await migrations.group("g-unknown") is None


async def test_get_many_keeps_the_order_asked_and_skips_unknown_ids(
    migrations: MigrationStore,
) -> None:
    await make_group(migrations, GROUP, "m-1", "m-2", "m-3")
    found = await migrations.get_many(["m-3", "m-nope", "m-1"])
    assert [m.migration_id for m in found] == ["m-3", "m-1"]
    assert await migrations.get_many([]) == []


async def test_pages_follow_admission_order(migrations: MigrationStore) -> None:
    first = await make_group(migrations, "g-a", "m-a1", "m-a2")
    second = await make_group(migrations, "g-b", "m-b1")
    third = await make_group(migrations, "g-c", "m-c1", "m-c2")
    assert first < second < third
    everything = await migrations.page(0, 100)
    assert everything[:2] == sorted(["m-a1", "m-a2"])  # one group shares its admission
    assert everything[2] == "m-b1"
    assert sorted(everything[3:]) == ["m-c1", "m-c2"]
    assert (
        await migrations.page(0, 2) + await migrations.page(2, 2) + await migrations.page(4, 2)
        == everything
    )
    assert await migrations.page(5, 10) == []
    assert await migrations.active_groups() == ["g-a", "g-b", "g-c"]
    assert await migrations.counts() == {"queued": 5}


async def test_a_finished_group_leaves_the_active_list(migrations: MigrationStore) -> None:
    await make_group(migrations, "g-a", "m-a")
    await make_group(migrations, "g-b", "m-b")
    await migrations.finish_group("g-a")
    assert await migrations.active_groups() == ["g-b"]
    assert await migrations.group("g-a") is not None  # the record stays for status


# --- compare-and-set ------------------------------------------------------------------


async def test_a_transition_sets_the_step_and_moves_the_counts(
    store: StateStore, migrations: MigrationStore
) -> None:
    await make_group(migrations, GROUP, "m-1", "m-2")
    lease = await lease_for(store)
    await move(migrations, "m-1", lease, "queued", "preparing", "queued", "running")

    stored = await migrations.get("m-1")
    assert stored is not None
    assert (stored.step, stored.public) == ("preparing", "running")
    assert json.loads(stored.record)["step"] == "preparing"
    assert await migrations.counts() == {"queued": 1, "running": 1}

    # A step change within one public state leaves the counts alone.
    await move(migrations, "m-1", lease, "preparing", "powering_off", "running", "running")
    assert await migrations.counts() == {"queued": 1, "running": 1}
    await move(migrations, "m-1", lease, "powering_off", "completed", "running", "completed")
    assert await migrations.counts() == {"queued": 1, "completed": 1}  # zeros are not shown


async def test_a_wrong_expected_step_is_refused_naming_both_steps(
    store: StateStore, migrations: MigrationStore
) -> None:
    await make_group(migrations, GROUP, "m-1")
    lease = await lease_for(store)
    await move(migrations, "m-1", lease, "queued", "preparing", "queued", "running")

    with pytest.raises(IncorrectState) as raised:
        await move(migrations, "m-1", lease, "queued", "preparing", "queued", "running")
    message = str(raised.value)
    assert "m-1" in message and "'preparing'" in message
    with pytest.raises(IncorrectState, match=r"'preparing'.*'snapshotting'"):
        await move(migrations, "m-1", lease, "transferring", "snapshotting", "running", "running")
    stored = await migrations.get("m-1")
    assert stored is not None and stored.step == "preparing"
    assert await migrations.counts() == {"running": 1}


async def test_a_transition_of_an_unknown_migration_names_none(
    store: StateStore, migrations: MigrationStore
) -> None:
    lease = await lease_for(store)
    with pytest.raises(IncorrectState, match=r"'\(none\)'"):
        await move(migrations, "m-ghost", lease, "queued", "preparing", "queued", "running")


async def test_a_stale_lease_token_cannot_write(
    store: StateStore, migrations: MigrationStore, redis: aioredis.Redis, keys: Keys
) -> None:
    await make_group(migrations, GROUP, "m-1")
    old = await lease_for(store, "ferry-a")
    await move(migrations, "m-1", old, "queued", "preparing", "queued", "running")
    # The lease runs out, as if its owner stalled (Redis's clock is real: expire it by hand).
    await redis.hset(keys.lease(LEASE), "expires", 0)
    new_owner = await lease_for(store, "ferry-b")
    assert new_owner.token > old.token

    with pytest.raises(LeaseLost) as raised:
        await move(migrations, "m-1", old, "preparing", "powering_off", "running", "running")
    assert raised.value.token == old.token and raised.value.resource == LEASE
    stored = await migrations.get("m-1")
    assert stored is not None and stored.step == "preparing"
    # The current owner carries on from what is stored.
    await move(migrations, "m-1", new_owner, "preparing", "powering_off", "running", "running")


async def test_a_write_without_any_lease_in_redis_is_refused(
    store: StateStore, migrations: MigrationStore
) -> None:
    await make_group(migrations, GROUP, "m-1")
    lease = await lease_for(store)
    await Leases(store, "ferry-a", 30).release(lease)
    with pytest.raises(LeaseLost):
        await move(migrations, "m-1", lease, "queued", "preparing", "queued", "running")
    # Unfenced writes (token None) are what creation-time code may do.
    await move(migrations, "m-1", None, "queued", "preparing", "queued", "running")


async def test_a_cancel_request_is_a_flag_on_the_record(
    store: StateStore, migrations: MigrationStore
) -> None:
    await make_group(migrations, GROUP, "m-1", "m-2")
    await migrations.request_cancel("m-1")
    one, two = await migrations.get_many(["m-1", "m-2"])
    assert one.cancel_requested and not two.cancel_requested
    # The flag survives later transitions.
    lease = await lease_for(store)
    await move(migrations, "m-1", lease, "queued", "cancelled", "queued", "cancelled")
    stored = await migrations.get("m-1")
    assert stored is not None and stored.cancel_requested and stored.step == "cancelled"


# --- VM locks and request idempotency ----------------------------------------------


async def lock(migrations: MigrationStore, site: str, vm_id: str, migration_id: str) -> str:
    return await migrations.lock_vm(
        site, vm_id, migration_id, pending_s=60, finished=("completed", "failed", "cancelled")
    )


async def test_one_migration_per_vm(migrations: MigrationStore) -> None:
    assert await migrations.lock_holder("onprem", "vm-1") is None
    assert await lock(migrations, "onprem", "vm-1", "m-1") == "m-1"
    assert await lock(migrations, "onprem", "vm-1", "m-1") == "m-1"  # again: still ours
    assert await lock(migrations, "onprem", "vm-1", "m-2") == "m-1"  # someone else's
    assert await migrations.lock_holder("onprem", "vm-1") == "m-1"
    # Locks are per site and per VM.
    assert await lock(migrations, "cloud", "vm-1", "m-2") == "m-2"
    assert await lock(migrations, "onprem", "vm-2", "m-2") == "m-2"

    await migrations.unlock_vm("onprem", "vm-1", "m-2")  # not the holder: nothing happens
    assert await migrations.lock_holder("onprem", "vm-1") == "m-1"
    await migrations.unlock_vm("onprem", "vm-1", "m-1")
    assert await migrations.lock_holder("onprem", "vm-1") is None
    assert await lock(migrations, "onprem", "vm-1", "m-2") == "m-2"


async def test_a_request_is_claimed_once(migrations: MigrationStore) -> None:
    assert await migrations.request("req-1") is None
    assert await migrations.claim_request("req-1", ["m-1", "m-2"]) == ["m-1", "m-2"]
    assert await migrations.claim_request("req-1", ["m-3"]) == ["m-1", "m-2"]
    assert await migrations.request("req-1") == ["m-1", "m-2"]
    assert await migrations.claim_request("req-2", ["m-3"]) == ["m-3"]


async def test_concurrent_claims_agree_on_one_answer(migrations: MigrationStore) -> None:
    answers = await asyncio.gather(
        *(migrations.claim_request("req-1", [f"m-{n}"]) for n in range(10))
    )
    assert len({tuple(answer) for answer in answers}) == 1


async def test_admission_numbers_grow(migrations: MigrationStore) -> None:
    numbers = [await migrations.next_admission() for _ in range(5)]
    assert numbers == sorted(set(numbers))


async def test_everything_lives_under_the_prefix(
    migrations: MigrationStore, redis: aioredis.Redis, keys: Keys
) -> None:
    await make_group(migrations, GROUP, "m-1")
    await lock(migrations, "onprem", "vm-1", "m-1")
    await migrations.claim_request("req-1", ["m-1"])
    found = {key.decode() async for key in redis.scan_iter(match=keys.pattern)}
    assert found == {
        keys.migration("m-1"), keys.migrations, keys.migration_counts, keys.group(GROUP),
        keys.active_groups, keys.admission, keys.vm_lock("onprem", "vm-1"), keys.request("req-1"),
    }  # fmt: skip
