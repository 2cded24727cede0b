"""Policies: the default overlaid by source then target cluster; caps combine as the lower."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from appliance.embedded import RedisServer
from appliance.orchestrator.limits import Room
from appliance.orchestrator.record import MigrationRecord, TransferOptions
from appliance.orchestrator.resume import chunk_indices
from appliance.orchestrator.states import Step
from appliance.state.keys import Keys
from appliance.state.policy import Policies, Policy, lower_cap
from appliance.state.store import StateStore, connect
from appliance.storage.extents import Extent
from messages.common import MigrationType


@pytest.fixture
async def policies(
    redis: aioredis.Redis, redis_server: RedisServer, keys: Keys
) -> AsyncIterator[Policies]:
    store = StateStore(connect(redis_server.url), keys)
    yield Policies(store)
    await store.close()


async def test_a_cluster_policy_overrides_the_default_and_the_target_wins(
    policies: Policies,
) -> None:
    await policies.set(None, Policy(max_concurrent_migrations=8, bandwidth_cap_mbps=100.0))
    await policies.set("src", Policy(bandwidth_cap_mbps=50.0))
    await policies.set("dst", Policy(max_concurrent_migrations=2, bandwidth_cap_mbps=20.0))
    assert await policies.for_clusters("other", None) == Policy(
        max_concurrent_migrations=8, bandwidth_cap_mbps=100.0
    )
    assert (await policies.for_clusters("src", None)).bandwidth_cap_mbps == 50.0
    both = await policies.for_clusters("src", "dst")
    assert both == Policy(max_concurrent_migrations=2, bandwidth_cap_mbps=20.0)
    assert await policies.own("src") == Policy(bandwidth_cap_mbps=50.0)


def test_the_lower_cap_holds_and_none_means_uncapped() -> None:
    assert lower_cap(None, None) is None
    assert lower_cap(5.0, None) == 5.0
    assert lower_cap(None, 3.0) == 3.0
    assert lower_cap(5.0, 3.0) == 3.0


def test_changed_ranges_map_to_every_chunk_they_touch() -> None:
    mib = 1 << 20
    changed = [Extent(0, 4096), Extent(3 * mib - 1, 2), Extent(10 * mib, 2 * mib)]
    assert chunk_indices(changed, mib) == [0, 2, 3, 10, 11]
    assert chunk_indices([Extent(5, 0)], mib) == []


def _record(n: int, source: str, target: str | None = None) -> MigrationRecord:
    return MigrationRecord(
        migration_id=f"m-{n}", request_id="r", correlation_id="c", group_id=f"g-{n}",
        admission=n, site="onprem", vm_id=f"vm-{n}", vm_name=f"vm-{n}",
        migration_type=MigrationType.COLD, step=Step.TRANSFERRING, target_site="cloud",
        target_pool=None, target_name=f"vm-{n}", network_map=(), options=TransferOptions(),
        disks=(), source_cluster=source, target_cluster=target,
    )  # fmt: skip


async def test_a_cluster_limit_holds_that_cluster_in_order_and_lets_others_go(
    policies: Policies,
) -> None:
    await policies.set("a", Policy(max_concurrent_migrations=2))
    await policies.set("big", Policy(max_concurrent_migrations=100))
    room = Room(policies, [_record(1, "a"), _record(2, "b", "big")])
    assert not await room.fits([_record(3, "a"), _record(4, "a")])  # 1 + 2 > 2
    assert not await room.fits([_record(5, "a")])  # would fit, but waits behind the group
    assert await room.fits([_record(6, "b")])  # b has no limit of its own
    assert await room.fits([_record(7, "c", "big")])
    room.take([_record(7, "c", "big")])
    fresh = Room(policies, [_record(1, "a")])
    assert await fresh.fits([_record(5, "a")])  # 1 + 1 <= 2
    fresh.take([_record(5, "a")])
    assert not await fresh.fits([_record(8, "a")])
    # A group alone may always start, however large, so it cannot wait forever.
    assert await Room(policies, []).fits([_record(n, "a") for n in range(9, 14)])
