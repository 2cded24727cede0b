"""Epochs through Redis: the cache's RedisEpochSink against the on-prem EpochService.

A real redis-server, a real OnpremIoManager over a lab disk, the project's NBD
client writing the staged chunks: only the two processes are folded into one.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from pydantic import SecretStr

from appliance.components.cache.shipping import EpochManifest, ManifestEntry
from appliance.components.cache_runtime import CacheRuntime
from appliance.components.epochs import EpochService, RedisEpochSink, parse_address
from appliance.components.onprem import EpochManifest as OnpremManifest
from appliance.components.onprem import OnpremDiskOrder, OnpremIoManager, current_export
from appliance.components.orders import ComponentId, Order, OrderAction, OutcomeKind, ParamValue
from appliance.components.runtimes import ComponentConfig
from appliance.datapath.nbd import NbdBackend, TcpAddress
from appliance.embedded import RedisServer, free_port
from appliance.errors import ComponentSilent, EpochOutOfOrder, EpochRejected, StaleToken
from appliance.settings import Settings
from appliance.state.keys import Keys
from appliance.state.store import StateStore, connect
from appliance.storage.hashing import chunk_hash
from tests.support.onprem import CHUNK, MIB, make_lab_disk

SIZE = 2 * MIB
DISK = "disk-0"
ONPREM = ComponentId("onprem", "onprem-1")
WAIT_S = 30.0


@dataclass
class Sides:
    store: StateStore
    manager: OnpremIoManager
    order: OnpremDiskOrder
    snapshot: bytes


@pytest.fixture
async def sides(
    redis: aioredis.Redis, redis_server: RedisServer, keys: Keys, tmp_path: Path
) -> AsyncIterator[Sides]:
    snapshot_id, content = await make_lab_disk(tmp_path / "lab", SIZE)
    order = OnpremDiskOrder("m-1", DISK, 3, tmp_path / "lab", snapshot_id)
    store = StateStore(connect(redis_server.url), keys)
    try:
        async with OnpremIoManager(tmp_path / "onprem") as manager:
            await manager.open_disk(order)
            yield Sides(store, manager, order, content)
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def serving(sides: Sides) -> AsyncIterator[EpochService]:
    service = EpochService(sides.store, ONPREM, sides.manager)
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        yield service
    finally:
        stop.set()
        await task


async def send(
    sink: RedisEpochSink, epoch: int, token: int, chunks: dict[int, bytes]
) -> EpochManifest:
    """Stage ``epoch`` through the sink, write its chunks over NBD, return its manifest."""
    address, export = await sink.stage(DISK, epoch, token)
    assert export == f"stage/{DISK}/{epoch}"
    async with await NbdBackend.connect(address, export) as staging:
        for index, data in sorted(chunks.items()):
            await staging.write(index * CHUNK, data)
        await staging.flush()
    entries = tuple(
        ManifestEntry(index * CHUNK, len(data), chunk_hash(data))
        for index, data in sorted(chunks.items())
    )
    return EpochManifest.of(entries)


async def current(sides: Sides) -> bytes:
    async with await NbdBackend.connect(sides.manager.address, current_export(DISK)) as cur:
        return await cur.read(0, cur.size)


async def test_an_epoch_staged_and_committed_through_redis_lands_exactly_and_replays_are_no_ops(
    sides: Sides,
) -> None:
    rng = random.Random(4)
    chunks = {1: rng.randbytes(CHUNK), 7: bytes(CHUNK), 30: rng.randbytes(CHUNK)}
    sink = RedisEpochSink(sides.store, ONPREM, timeout_s=WAIT_S)
    async with serving(sides):
        manifest = await send(sink, 1, sides.order.token, chunks)
        assert await current(sides) == sides.snapshot  # staged, not committed: invisible
        await sink.commit(DISK, 1, sides.order.token, manifest)
        expected = bytearray(sides.snapshot)
        for index, data in chunks.items():
            expected[index * CHUNK : index * CHUNK + len(data)] = data
        assert await current(sides) == bytes(expected)
        assert sides.manager.committed_epoch(DISK) == 1
        # A retried commit (its answer lost on the way) is a no-op, not an error.
        await sink.commit(DISK, 1, sides.order.token, manifest)
        assert sides.manager.committed_epoch(DISK) == 1
        # A commit whose manifest does not match what was staged is rejected, not applied.
        other = {2: rng.randbytes(CHUNK)}
        bad = await send(sink, 2, sides.order.token, other)
        wrong = EpochManifest.of((ManifestEntry(2 * CHUNK, CHUNK, chunk_hash(bytes(CHUNK))),))
        with pytest.raises(EpochRejected, match="do not match"):
            await sink.commit(DISK, 2, sides.order.token, wrong)
        await sink.commit(DISK, 2, sides.order.token, bad)  # the staging was kept: fixable
        assert sides.manager.committed_epoch(DISK) == 2
    assert await current(sides) == bytes(expected[: 2 * CHUNK]) + other[2] + bytes(
        expected[3 * CHUNK :]
    )


async def test_a_stale_token_is_refused_with_the_highest_token_on_prem(sides: Sides) -> None:
    newer = OnpremDiskOrder("m-1", DISK, 9, sides.order.disk_dir, sides.order.snapshot_id)
    await sides.manager.open_disk(newer)  # a new owner took the disk over
    sink = RedisEpochSink(sides.store, ONPREM, timeout_s=WAIT_S)
    async with serving(sides):
        with pytest.raises(StaleToken) as refused:
            await sink.stage(DISK, 1, sides.order.token)
        assert refused.value.highest == 9 and sink.refused == {DISK: 9}
        empty = EpochManifest.of(())
        with pytest.raises(StaleToken):
            await sink.commit(DISK, 1, sides.order.token, empty)
    assert sides.manager.committed_epoch(DISK) == 0
    assert await current(sides) == sides.snapshot


async def test_staging_an_epoch_on_prem_committed_already_says_which_comes_next(
    sides: Sides,
) -> None:
    """A cache that never heard its commit answered (killed, or the reply was lost) asks to
    stage that epoch again: it learns on-prem is past it, so its shipper replays the commit
    instead of staging forever."""
    sink = RedisEpochSink(sides.store, ONPREM, timeout_s=WAIT_S)
    async with serving(sides):
        manifest = await send(sink, 1, sides.order.token, {3: bytes(range(256)) * (CHUNK // 256)})
        await sink.commit(DISK, 1, sides.order.token, manifest)
        with pytest.raises(EpochOutOfOrder) as past:
            await sink.stage(DISK, 1, sides.order.token)
        assert past.value.expected == 2
        await sink.commit(DISK, 1, sides.order.token, manifest)  # the replay is a no-op
    assert sides.manager.committed_epoch(DISK) == 1


async def test_a_request_made_while_on_prem_is_down_is_answered_when_it_starts(
    sides: Sides, redis: aioredis.Redis
) -> None:
    sink = RedisEpochSink(sides.store, ONPREM, timeout_s=WAIT_S)
    requests = f"{sides.store.keys.prefix}:epoch-requests:{ONPREM}"
    asking = asyncio.create_task(sink.stage(DISK, 1, sides.order.token))
    appended = await redis.xread({requests: "0-0"}, block=int(WAIT_S * 1000))
    assert appended and not asking.done()
    async with serving(sides):
        address, export = await asyncio.wait_for(asking, WAIT_S)
    assert export == f"stage/{DISK}/1" and address == sides.manager.address
    assert sides.manager.status().epochs_staged == {DISK: (1,)}


async def test_a_silent_on_prem_is_a_bounded_wait(sides: Sides) -> None:
    sink = RedisEpochSink(sides.store, ONPREM, timeout_s=0.5)
    with pytest.raises(ComponentSilent):
        await sink.stage(DISK, 1, sides.order.token)


class CrashingManager(OnpremIoManager):
    """An I/O manager that dies (for its epoch service) on the first commit it is asked."""

    def __init__(self, data_dir: Path, address: TcpAddress) -> None:
        super().__init__(data_dir, address=address)
        self.asked = asyncio.Event()
        self.crash = asyncio.Event()

    async def commit_epoch(
        self, disk_id: str, epoch: int, token: int, manifest: OnpremManifest
    ) -> None:
        self.asked.set()
        await self.crash.wait()
        raise ConnectionError("the process died here: no answer, no acknowledgement")


async def test_an_epoch_on_prem_lost_in_a_restart_before_its_commit_is_sent_again(
    redis: aioredis.Redis, redis_server: RedisServer, keys: Keys, tmp_path: Path
) -> None:
    """Copied to the staging export, then on-prem restarts (discarding the staging) before
    the commit: the commit is rejected, and the cache sends the whole epoch again."""
    snapshot_id, snapshot = await make_lab_disk(tmp_path / "lab", SIZE)
    disk_order = OnpremDiskOrder("m-1", DISK, 1, tmp_path / "lab", snapshot_id)
    address = TcpAddress("127.0.0.1", free_port())
    settings = Settings(
        redis_url=SecretStr(redis_server.url),
        cache_scale=1 / 256,
        cache_retry_delay_s=0.1,
        component_epoch_timeout_s=WAIT_S,
    )
    config = ComponentConfig(
        ComponentId("cache", "cache-1"), tmp_path / "cache", "127.0.0.1", 0,
        redis_server.url, keys.prefix, 1.0, 3.0, 30.0, settings,
    )  # fmt: skip
    store = StateStore(connect(redis_server.url), keys)
    params: dict[str, ParamValue] = {"size": SIZE, "upstream": str(address), "onprem": ONPREM.name}
    data = random.Random(2).randbytes(3 * CHUNK + 5)
    try:
        first = CrashingManager(tmp_path / "onprem", address)
        async with contextlib.AsyncExitStack() as first_alive, CacheRuntime(config) as runtime:
            await first_alive.enter_async_context(first)
            await first.open_disk(disk_order)
            opened = await runtime.apply(
                Order(DISK, OrderAction.OPEN, "m-1", 1, "l", params=params)
            )
            assert opened.kind is OutcomeKind.APPLIED, opened
            vm = parse_address(str(opened.result["address"]))
            async with await NbdBackend.connect(vm, DISK) as disk:
                await disk.write(CHUNK - 7, data)
                await disk.flush()
            async with serving_with(store, first):
                cut = await runtime.apply(Order(DISK, OrderAction.CUT_EPOCH, "m-1", 1, "l", 1))
                assert cut.result["epoch"] == 1
                await asyncio.wait_for(first.asked.wait(), WAIT_S)  # copied; commit asked
                first.crash.set()
            await first_alive.aclose()  # on-prem is down; then it comes back
            async with OnpremIoManager(tmp_path / "onprem", address=address) as second:
                await second.open_disk(disk_order)  # discards the uncommitted staging
                async with serving_with(store, second):
                    await asyncio.wait_for(runtime.cache.wait_committed(DISK, 1), WAIT_S)
                async with await NbdBackend.connect(address, current_export(DISK)) as cur:
                    image = await cur.read(0, SIZE)
    finally:
        await store.close()
    expected = bytearray(snapshot)
    expected[CHUNK - 7 : CHUNK - 7 + len(data)] = data
    assert image == bytes(expected)


@contextlib.asynccontextmanager
async def serving_with(store: StateStore, manager: OnpremIoManager) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(EpochService(store, ONPREM, manager).run(stop))
    try:
        yield
    finally:
        stop.set()
        await task
