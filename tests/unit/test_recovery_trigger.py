"""The recovery trigger against a real redis-server: which migrations a lost component sends
back (only those that depend on it, with their groups), for data lost and for a deadline."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from appliance.clock import FakeClock
from appliance.components.heartbeat import ComponentHealth
from appliance.components.orders import (
    ComponentId,
    ComponentKeys,
    Order,
    OrderAction,
    OrderOutcome,
)
from appliance.embedded import RedisServer
from appliance.health import HealthBoard
from appliance.orchestrator.record import DiskPlan, MigrationRecord, TransferOptions, dump
from appliance.orchestrator.recovery import ASK_RECOVER, Lost, RecoveryEvent
from appliance.orchestrator.states import Step, public_state
from appliance.service.recovery import RecoveryTrigger
from appliance.state.events import EventLog
from appliance.state.keys import Keys
from appliance.state.migrations import MigrationStore, NewMigration
from appliance.state.store import StateStore, connect
from messages.common import MigrationType

AT = "2026-12-01T12:00:00+00:00"
ONPREM = ComponentId("onprem", "onprem-1")
CACHE_1 = ComponentId("cache", "cache-1")
CACHE_2 = ComponentId("cache", "cache-2")


@pytest.fixture
async def store(
    redis: aioredis.Redis, redis_server: RedisServer, keys: Keys
) -> AsyncIterator[StateStore]:
    store = StateStore(connect(redis_server.url), keys)
    yield store
    await store.close()


def record(n: int, group: str, kind: MigrationType, step: Step, node: str) -> MigrationRecord:
    disk = DiskPlan("disk-0", "d0", 4096, True, f"m-{n}-disk-0")
    return MigrationRecord(
        migration_id=f"m-{n}", request_id="r", correlation_id=f"c-{n}", group_id=group,
        admission=n, site="onprem", vm_id=f"vm-{n}", vm_name=f"vm-{n}", migration_type=kind,
        step=step, target_site="cloud", target_pool=None, target_name=f"vm-{n}",
        network_map=(), options=TransferOptions(), disks=(disk,), cache_node=node,
        created_at=AT, updated_at=AT,
    )  # fmt: skip


async def add_group(store: StateStore, group: str, records: list[MigrationRecord]) -> None:
    members = [
        NewMigration(r.migration_id, r.step.value, public_state(r.step, False).value, dump(r))
        for r in records
    ]
    migrations = MigrationStore(store)
    assert await migrations.create_group(group, f"req-{group}", records[0].admission, members)


async def lab(store: StateStore) -> None:
    tbc, warm, cold = MigrationType.TBC, MigrationType.WARM, MigrationType.COLD
    resting = Step.RUNNING_IN_CLOUD
    pair = [record(n, "g-1", tbc, resting, "cache-1") for n in (1, 2)]
    await add_group(store, "g-1", pair)
    await add_group(store, "g-2", [record(3, "g-2", tbc, resting, "cache-2")])
    await add_group(store, "g-3", [record(4, "g-3", warm, Step.CUT_OVER, "cache-1")])
    await add_group(store, "g-4", [record(5, "g-4", warm, Step.RECONCILING, "cache-1")])
    await add_group(store, "g-5", [record(6, "g-5", cold, Step.TRANSFERRING, "cache-1")])


def trigger(
    store: StateStore,
    instances: list[ComponentId],
    after_s: float,
    board: HealthBoard | None = None,
) -> RecoveryTrigger:
    return RecoveryTrigger(
        store,
        ComponentHealth(store, 1.0),
        instances,
        onprem=str(ONPREM),
        after_s=after_s,
        interval_s=1.0,
        clock=FakeClock(),
        board=board,
    )


async def lose_data(store: StateStore, instance: ComponentId, disk: str) -> None:
    order = Order(disk, OrderAction.CUT_EPOCH, "m-1", 3, "group:g-1", 2)
    outcome = OrderOutcome.data_lost(order, "its data directory no longer holds it")
    key = ComponentKeys(store.keys, instance).outcomes
    await store.redis.hset(key, disk, outcome.to_json())


async def asked(store: StateStore) -> dict[str, Lost]:
    migrations = MigrationStore(store)
    found = {}
    for n in range(1, 7):
        raw = (await migrations.asks(f"m-{n}")).get(ASK_RECOVER)
        if raw is not None:
            found[f"m-{n}"] = Lost.decode(raw)
    return found


async def test_a_cache_s_lost_disk_sends_back_its_group_and_no_one_else(store: StateStore) -> None:
    await lab(store)
    # cache-1 lost one disk of m-1: m-1's group goes back (m-2 with it); m-5 (warm, also on
    # cache-1, a disk it did not lose), the VM cut over, the cold one and cache-2's stay.
    await lose_data(store, CACHE_1, "m-1-disk-0")
    sender = trigger(store, [ONPREM, CACHE_1], after_s=600.0)
    assert sorted(await sender.check()) == ["m-1", "m-2"]
    lost = await asked(store)
    assert set(lost) == {"m-1", "m-2"}
    assert lost["m-1"].component == "cache/cache-1" and "data" in lost["m-1"].reason
    assert await sender.check() == []  # asked once
    events = [e for e in await EventLog(store).read() if e.kind == RecoveryEvent.RECOVERY_STARTED]
    assert len(events) == 1 and events[0].fields["migrations"] == "m-1,m-2"


async def test_a_cache_failed_past_the_deadline_sends_back_every_vm_on_it(
    store: StateStore,
) -> None:
    await lab(store)
    # No heartbeat from cache-2 ever: failed; past a deadline of 0 s it is lost. Only the
    # VMs on cache-2 depend on it.
    assert sorted(await trigger(store, [CACHE_2], after_s=0.0).check()) == ["m-3"]
    # Not yet past the deadline: nothing.
    assert await trigger(store, [CACHE_1], after_s=600.0).check() == []
    # cache-1 past it: the tbc group and the warm VM caught reconciling; not the VM cut over
    # to its volumes, nor the cold one.
    assert sorted(await trigger(store, [CACHE_1], after_s=0.0).check()) == ["m-1", "m-2", "m-5"]
    reason = (await asked(store))["m-5"].reason
    assert "not repaired within 0 s" in reason


def board_with(*names: str) -> HealthBoard:
    board = HealthBoard(FakeClock())
    for name in names:
        board.register(name, timeout_s=1.0)
        board.ok(name)
    return board


async def test_a_component_whose_repair_gave_up_is_lost_before_the_deadline(
    store: StateStore,
) -> None:
    await lab(store)
    board = board_with(str(CACHE_2))
    board.failed(str(CACHE_2), "silent")
    sender = trigger(store, [CACHE_2], after_s=600.0, board=board)
    assert await sender.check() == []  # failed, not yet given up, the deadline far off
    board.mark_unrepairable(str(CACHE_2), "3 attempts in 300 s")
    assert await sender.check() == ["m-3"]
    reason = (await asked(store))["m-3"].reason
    assert "repair gave up" in reason and "3 attempts" in reason


async def test_the_wan_link_failed_past_its_threshold_sends_the_caches_vms_back_once_it_returns(
    store: StateStore,
) -> None:
    await lab(store)
    board = board_with("wan_link", str(CACHE_1))
    sender = trigger(store, [ONPREM, CACHE_1], after_s=600.0, board=board)
    board.degraded("wan_link", "down 10 s")  # within its threshold: tolerated
    assert await sender.check() == []
    board.ok("wan_link")
    assert await sender.check() == []
    board.failed("wan_link", "down past its threshold")
    assert await sender.check() == []  # nothing crosses the link yet: wait for it
    board.ok("wan_link")
    assert sorted(await sender.check()) == ["m-1", "m-2", "m-5"]
    assert "WAN link" in (await asked(store))["m-1"].reason
    assert await sender.check() == []  # once
