"""The cloud cache and the on-prem I/O manager end to end, as real processes.

The on-prem component serves a lab disk with a migrate-time snapshot; the
cache component's upstream is the on-prem ``cur/`` export through a fault
proxy (the WAN link); epochs travel through Redis (stage, commit) and NBD
(the data). The test is the control plane: it holds a real lease, gives
orders, writes and reads through the cache's NBD export with the project's
NBD client, and reads on-prem ``cur/`` directly.
"""

from __future__ import annotations

import os
import random
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from appliance.components.control import ComponentOrders
from appliance.components.epochs import parse_address
from appliance.components.heartbeat import ComponentReport
from appliance.components.orders import (
    ComponentId,
    ComponentKeys,
    Order,
    OrderAction,
    OrderOutcome,
    OutcomeCode,
    OutcomeKind,
    ParamValue,
)
from appliance.datapath.nbd import NbdBackend
from appliance.embedded import RedisServer, free_port
from appliance.errors import LeaseLost
from appliance.state.keys import Keys
from appliance.state.leases import Lease, Leases
from tests.support.components import (
    CACHE,
    ONPREM,
    WAIT_S,
    CachedDisk,
    ComponentPair,
    cached_disk,
    component_pair,
    take_lease,
)
from tests.support.faultproxy import FaultProxy
from tests.support.onprem import MIB, make_lab_disk

SIZE = 4 * MIB
DISK = "disk-1"
RESOURCE = "group:g-1"


@dataclass
class Lab:
    pair: ComponentPair
    proxy: FaultProxy
    disk_dir: Path
    snapshot_id: str
    snapshot: bytes
    onprem_address: str


@pytest.fixture
async def lab(
    redis: aioredis.Redis, redis_server: RedisServer, keys: Keys, tmp_path: Path
) -> AsyncIterator[Lab]:
    snapshot_id, content = await make_lab_disk(tmp_path / "lab-disk", SIZE, seed=3)
    # A cache the size of the disk (12 MiB): no early epoch cuts itself in this test.
    scale = {"FERRY_CACHE_SCALE": str(1 / 256)}
    async with component_pair(redis_server, keys, tmp_path, scale) as pair:
        onprem = await pair.figures(ONPREM)
        await pair.figures(CACHE)
        address = parse_address(str(onprem["address"]))
        async with FaultProxy(address.host, address.port) as proxy:
            yield Lab(pair, proxy, tmp_path / "lab-disk", snapshot_id, content, str(address))


async def lease_for(lab: Lab, owner: str) -> Lease:
    return await take_lease(lab.pair.store, owner, RESOURCE)


def onprem_open(lab: Lab, lease: Lease) -> Order:
    params: dict[str, ParamValue] = {
        "disk_dir": str(lab.disk_dir),
        "snapshot_id": lab.snapshot_id,
    }
    return Order(DISK, OrderAction.OPEN, "m-1", lease.token, lease.resource, params=params)


def cache_open(lab: Lab, lease: Lease) -> Order:
    params: dict[str, ParamValue] = {
        "size": SIZE,
        "upstream": f"127.0.0.1:{lab.proxy.port}",
        "onprem": ONPREM.name,
    }
    return Order(DISK, OrderAction.OPEN, "m-1", lease.token, lease.resource, params=params)


def cut(lease: Lease, request: int) -> Order:
    return Order(DISK, OrderAction.CUT_EPOCH, "m-1", lease.token, lease.resource, request)


async def applied(orders: ComponentOrders, order: Order) -> OrderOutcome:
    outcome = await orders.give_and_wait(order, WAIT_S)
    assert outcome.kind is OutcomeKind.APPLIED, outcome
    return outcome


async def read_current(lab: Lab) -> bytes:
    address = parse_address(lab.onprem_address)
    async with await NbdBackend.connect(address, f"cur/{DISK}") as current:
        return await current.read(0, current.size)


async def write_some(
    disk: NbdBackend, image: bytearray, rng: random.Random, count: int
) -> list[tuple[int, int]]:
    """Random writes (unaligned offsets and sizes) through the cache, then a FLUSH."""
    done = []
    for _ in range(count):
        length = rng.randrange(1, 100_000)
        offset = rng.randrange(0, SIZE - length)
        data = rng.randbytes(length)
        await disk.write(offset, data)
        image[offset : offset + length] = data
        done.append((offset, length))
    await disk.flush()
    return done


def committed(epoch: int) -> Callable[[ComponentReport], bool]:
    return lambda r: r.figures.get("committed_epoch", {}).get(DISK) == epoch


async def test_writes_reach_on_prem_in_committed_epochs_and_a_stale_owner_is_refused(
    lab: Lab,
) -> None:
    pair, rng = lab.pair, random.Random(9)
    onprem_orders, cache_orders = pair.orders(ONPREM), pair.orders(CACHE)
    owner_a = await lease_for(lab, "ferry-a")

    opened = await applied(onprem_orders, onprem_open(lab, owner_a))
    assert opened.result["current"] == f"cur/{DISK}"
    exported = await applied(cache_orders, cache_open(lab, owner_a))
    vm_disk = parse_address(str(exported.result["address"]))

    async with await NbdBackend.connect(vm_disk, str(exported.result["export"])) as disk:
        # Read-through: every byte through the cache equals the snapshot (misses, then hits).
        assert disk.size == SIZE
        assert await disk.read(0, SIZE) == lab.snapshot
        for _ in range(20):
            offset, length = rng.randrange(SIZE - 1), rng.randrange(1, 100_000)
            length = min(length, SIZE - offset)
            assert await disk.read(offset, length) == lab.snapshot[offset : offset + length]
        assert lab.proxy.bytes_down > 0  # the misses came over the link

        # Epoch 1: writes, a cut, the on-prem commit; cur/ equals the writes exactly.
        image = bytearray(lab.snapshot)
        await write_some(disk, image, rng, 12)
        assert await read_current(lab) == lab.snapshot  # nothing committed yet
        outcome = await applied(cache_orders, cut(owner_a, 1))
        assert outcome.result["epoch"] == 1
        await pair.wait(ONPREM, committed(1))
        await pair.wait(CACHE, committed(1))
        after_one = bytes(image)
        assert await read_current(lab) == after_one
        again = await applied(cache_orders, cut(owner_a, 1))  # the same order: no new cut
        assert again.result["epoch"] == 1

        # Writes not yet in a committed epoch are invisible on-prem.
        await write_some(disk, image, rng, 12)
        after_two = bytes(image)
        assert await read_current(lab) == after_one
        assert await disk.read(0, SIZE) == after_two

        # Epoch 2 is cut by owner A while the link is down, so it cannot ship ...
        lab.proxy.drop_every(1)
        lab.proxy.drop_now()
        assert (await applied(cache_orders, cut(owner_a, 2))).result["epoch"] == 2

        # ... and B takes the migration over and tells on-prem first.
        await Leases(pair.store, "ferry-a", ttl_s=300).release(owner_a)
        owner_b = await lease_for(lab, "ferry-b")
        assert owner_b.token > owner_a.token
        await applied(onprem_orders, onprem_open(lab, owner_b))
        lab.proxy.drop_every(None)

        # A's epoch is refused on-prem (stale token): it stays dirty in the cache.
        refused = await pair.wait(
            CACHE, lambda r: r.figures.get("shipping_refused", {}).get(DISK) == owner_b.token
        )
        assert refused.figures["epochs_in_flight"] == {DISK: [2]}
        assert refused.figures["committed_epoch"] == {DISK: 1}
        assert (
            isinstance(refused.figures["dirty_bytes"], int) and refused.figures["dirty_bytes"] > 0
        )
        assert await read_current(lab) == after_one
        with pytest.raises(LeaseLost):  # A can give no order any more
            await cache_orders.give(cut(owner_a, 3))

        # B's open takes the cache over: epoch 2 ships with B's token and commits.
        await applied(cache_orders, cache_open(lab, owner_b))
        await pair.wait(ONPREM, committed(2))
        await pair.wait(CACHE, committed(2))
        assert await read_current(lab) == after_two
        assert await disk.read(0, SIZE) == after_two

    # An order of A's that reaches the component anyway (written past the fencing
    # script) is refused by the component itself: it has accepted B's token.
    stale = cut(owner_a, 3)
    await hand_written(pair, CACHE, stale)
    outcome = await cache_orders.wait(stale, WAIT_S)
    assert outcome.kind is OutcomeKind.REFUSED and outcome.code is OutcomeCode.STALE_TOKEN
    figures = await pair.figures(CACHE)
    assert figures["open_epoch"] == {DISK: 3} and figures["committed_epoch"] == {DISK: 2}


async def hand_written(pair: ComponentPair, instance: ComponentId, order: Order) -> None:
    keys = ComponentKeys(pair.store.keys, instance)
    await pair.store.redis.hset(keys.orders, order.disk_id, order.to_json())
    await pair.store.redis.xadd(keys.order_events, {"disk": order.disk_id})


async def test_killed_components_reopen_their_disks_and_lose_no_flushed_write(
    redis: aioredis.Redis, redis_server: RedisServer, keys: Keys, tmp_path: Path
) -> None:
    """A new owner takes over with cut orders only (no new open); then SIGKILL the cache,
    then on-prem: each restarts (supervised), reopens its disk by itself (nobody gives
    ``open`` again) with the new owner's token, and the epochs after it are exact."""
    snapshot_id, snapshot = await make_lab_disk(tmp_path / "lab-disk", SIZE, seed=5)
    rng = random.Random(12)
    binds = {ONPREM: f"127.0.0.1:{free_port()}", CACHE: f"127.0.0.1:{free_port()}"}
    async with cached_disk(
        redis_server,
        keys,
        tmp_path,
        disk_dir=tmp_path / "lab-disk",
        snapshot_id=snapshot_id,
        size=SIZE,
        disk_id=DISK,
        extra_env={"FERRY_CACHE_SCALE": str(1 / 256)},
        nbd_binds=binds,
    ) as cached:
        pair, image = cached.pair, bytearray(snapshot)
        async with await NbdBackend.connect(cached.cache_address, cached.export) as disk:
            await write_some(disk, image, rng, 10)
        await Leases(pair.store, "ferry-a", ttl_s=300).release(cached.lease)
        cached.lease = await take_lease(pair.store, "ferry-b")
        assert await cached.cut_and_commit() == 1  # B's token reaches both through the cut
        assert await read_export(cached, f"cur/{DISK}") == bytes(image)

        async with await NbdBackend.connect(cached.cache_address, cached.export) as disk:
            await write_some(disk, image, rng, 10)  # acknowledged, then FLUSHed
        cache_pid = await pair.supervisor.wait_running(CACHE, timeout_s=WAIT_S)
        os.kill(cache_pid, signal.SIGKILL)
        await pair.supervisor.wait_running(CACHE, not_pid=cache_pid, timeout_s=WAIT_S)
        back = await pair.wait(
            CACHE, lambda r: r.pid != cache_pid and DISK in r.figures.get("exports", [])
        )
        assert back.figures["committed_epoch"] == {DISK: 1}
        async with await NbdBackend.connect(cached.cache_address, cached.export) as disk:
            assert await disk.read(0, SIZE) == bytes(image)  # every flushed write survived
        assert await cached.cut_and_commit() == 2
        assert await read_export(cached, f"cur/{DISK}") == bytes(image)

        onprem_pid = await pair.supervisor.wait_running(ONPREM, timeout_s=WAIT_S)
        os.kill(onprem_pid, signal.SIGKILL)
        await pair.supervisor.wait_running(ONPREM, not_pid=onprem_pid, timeout_s=WAIT_S)
        again = await pair.wait(ONPREM, lambda r: r.pid != onprem_pid and committed(2)(r))
        assert f"cur/{DISK}" in again.figures["exports"]
        async with await NbdBackend.connect(cached.cache_address, cached.export) as disk:
            await write_some(disk, image, rng, 10)
        assert await cached.cut_and_commit() == 3
        assert await read_export(cached, f"cur/{DISK}") == bytes(image)

        # The same cut order again, after the restarts: no new epoch.
        repeat = Order(DISK, OrderAction.CUT_EPOCH, "m-1", cached.lease.token, RESOURCE, 3)
        assert (await pair.orders(CACHE).give_and_wait(repeat, WAIT_S)).result["epoch"] == 3
        assert (await pair.figures(CACHE))["open_epoch"] == {DISK: 4}


async def read_export(cached: CachedDisk, export: str) -> bytes:
    async with await NbdBackend.connect(cached.onprem_address, export) as source:
        return await source.read(0, source.size)


async def test_a_link_cut_mid_epoch_resumes_and_the_epoch_commits_exactly(lab: Lab) -> None:
    pair, rng = lab.pair, random.Random(21)
    owner = await lease_for(lab, "ferry-a")
    await applied(pair.orders(ONPREM), onprem_open(lab, owner))
    exported = await applied(pair.orders(CACHE), cache_open(lab, owner))
    image = bytearray(lab.snapshot)
    async with await NbdBackend.connect(
        parse_address(str(exported.result["address"])), str(exported.result["export"])
    ) as disk:
        await write_some(disk, image, rng, 16)  # the misses' reads are done: writes are cached
    drops = lab.proxy.drops
    lab.proxy.drop_after(256 * 1024)  # the link dies a quarter MiB into the epoch's copy
    assert (await applied(pair.orders(CACHE), cut(owner, 1))).result["epoch"] == 1
    await pair.wait(ONPREM, committed(1))
    assert lab.proxy.drops > drops
    assert await read_current(lab) == bytes(image)
