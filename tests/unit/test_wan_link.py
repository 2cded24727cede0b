"""The WAN link between the sites: a blackhole shorter than the threshold stalls what crosses
it and is shown as degraded (Ready kept); longer, the link is failed.

Real parts: an NBD server for on-prem, the blackholing proxy between, the cache's
``Upstream`` and ``LinkWatch``, real heartbeats in Redis read by the appliance's probe."""

from __future__ import annotations

import asyncio
import random

import pytest
import redis.asyncio as aioredis

from appliance.clock import FakeClock
from appliance.components.cache.upstream import Upstream
from appliance.components.heartbeat import ComponentHealth as HeartbeatReader
from appliance.components.heartbeat import HeartbeatWriter
from appliance.components.orders import ComponentId
from appliance.datapath.link import LinkWatch
from appliance.datapath.nbd.channel import TcpAddress
from appliance.datapath.nbd.server import NbdServer
from appliance.errors import LinkDown
from appliance.health import HealthBoard
from appliance.service.health import (
    WAN_LINK,
    HealthEvent,
    HealthEvents,
    ServicesDegraded,
    WanProbe,
    refuse_if_degraded,
)
from appliance.state.events import EventLog
from appliance.state.keys import Keys
from appliance.state.store import StateStore
from appliance.storage.memory import MemoryBackend
from messages.commands import CloneVm, SourceCloneRequest, SourceCloneRequestBody
from messages.common import MigrationType
from messages.events import ComponentState
from tests.support.blackhole import BlackholeProxy

SIZE = 4 << 20
CACHE = ComponentId("cache", "cache-1")
ONPREM = ComponentId("onprem", "onprem-1")


async def onprem_disk() -> tuple[MemoryBackend, bytes]:
    content = random.Random(5).randbytes(SIZE)
    disk = MemoryBackend(SIZE, name="cur")
    await disk.write(0, content)
    return disk, content


async def test_a_miss_stalls_through_a_short_blackhole_and_gets_the_right_bytes() -> None:
    disk, content = await onprem_disk()
    async with (
        NbdServer({"cur": disk}) as server,
        BlackholeProxy(
            "127.0.0.1",
            server.address.port,  # type: ignore[union-attr]
        ) as wan,
    ):
        upstream = Upstream(
            TcpAddress("127.0.0.1", wan.port), "cur", retry_delay_s=0.05, timeout_s=60
        )
        try:
            assert await upstream.read(0, 4096) == content[:4096]  # connected before
            wan.blackhole()
            reading = asyncio.create_task(upstream.read(3 << 20, 70_000))
            fresh = Upstream(
                TcpAddress("127.0.0.1", wan.port), "cur", retry_delay_s=0.05, timeout_s=60
            )
            connecting = asyncio.create_task(fresh.read(5, 10))  # a new connection: held
            # Both wait on the link, neither fails.
            done, _ = await asyncio.wait({reading, connecting}, timeout=0.5)
            assert not done
            wan.heal()
            assert await reading == content[3 << 20 : (3 << 20) + 70_000]
            assert await connecting == content[5:15]
            await fresh.close()
        finally:
            await upstream.close()


async def test_a_miss_fails_only_once_the_blackhole_outlasts_the_threshold() -> None:
    disk, content = await onprem_disk()
    async with (
        NbdServer({"cur": disk}) as server,
        BlackholeProxy(
            "127.0.0.1",
            server.address.port,  # type: ignore[union-attr]
        ) as wan,
    ):
        upstream = Upstream(
            TcpAddress("127.0.0.1", wan.port), "cur", retry_delay_s=0.05, timeout_s=1.0
        )
        try:
            assert await upstream.read(0, 10) == content[:10]
            wan.blackhole()
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(LinkDown, match=r"unreachable for 1\.0s: no answer from on-prem"):
                await upstream.read(1 << 20, 4096)
            assert loop.time() - started >= 1.0  # not before the threshold
            wan.heal()
            # The wedged connection was let go: the next miss gets a new one.
            assert await upstream.read(1 << 20, 4096) == content[1 << 20 : (1 << 20) + 4096]
            assert wan.connections == 2
        finally:
            await upstream.close()


async def test_the_cache_s_link_watch_sees_a_blackhole_and_its_end() -> None:
    disk, _ = await onprem_disk()
    async with (
        NbdServer({"cur": disk}) as server,
        BlackholeProxy(
            "127.0.0.1",
            server.address.port,  # type: ignore[union-attr]
        ) as wan,
    ):
        now = [100.0]
        watch = LinkWatch(interval_s=0.1, probe_s=0.3, clock=lambda: now[0])
        assert watch.report() == {"peers": [], "down": {}}
        watch.use("disk-1", TcpAddress("127.0.0.1", wan.port))
        watch.use("disk-2", TcpAddress("127.0.0.1", wan.port))
        await watch.probe()
        peer = f"127.0.0.1:{wan.port}"
        assert watch.report() == {"peers": [peer], "down": {}}
        wan.blackhole()
        await watch.probe()
        now[0] += 7.5
        down = watch.report()["down"]
        assert isinstance(down, dict) and down[peer]["down_s"] == 7.5
        assert "no NBD greeting within 0.3s" in down[peer]["detail"]
        await watch.probe()  # still down: since the first failed probe
        assert watch.report()["down"][peer]["down_s"] == 7.5  # type: ignore[index]
        wan.heal()
        await watch.probe()
        assert watch.report() == {"peers": [peer], "down": {}}
        watch.release("disk-1")
        watch.release("disk-2")
        assert watch.report() == {"peers": [], "down": {}}


def clone(kind: MigrationType) -> SourceCloneRequest:
    return SourceCloneRequest(
        body=SourceCloneRequestBody(vms=(CloneVm(vm_id="vm-1"),), migration_type=kind)
    )


async def test_the_board_shows_the_link_degraded_within_the_threshold_and_failed_after(
    redis: aioredis.Redis, keys: Keys
) -> None:
    """The cache's heartbeat says its upstream is down and for how long; the appliance's
    probe makes that degraded (Ready, new migrations taken), then failed past the
    threshold (Not Ready naming it, refused), then recovered; each an event."""
    clock = FakeClock()
    board = HealthBoard(clock)
    store = StateStore(redis, keys)
    events = HealthEvents(board, clock)
    stop = asyncio.Event()
    writing = asyncio.create_task(events.run(EventLog(store), stop))
    figures: dict[str, object] = {"wan_link": {"peers": ["10.0.0.9:10809"], "down": {}}}
    writer = HeartbeatWriter(store, CACHE, lambda: figures, interval_s=1, ttl_s=60)
    reader = HeartbeatReader(store, 30)
    probe = WanProbe(reader, board, ONPREM, cache=CACHE, interval_s=1, threshold_s=300, clock=clock)
    try:
        await writer.beat()
        await probe.probe()
        assert board.is_ok(WAN_LINK) and "reached by the cache" in board.statuses()[0].detail

        down = {"down_s": 42.0, "detail": "no NBD greeting within 1.0s"}
        figures["wan_link"] = {"peers": ["10.0.0.9:10809"], "down": {"10.0.0.9:10809": down}}
        await writer.beat()
        await probe.probe()
        (link,) = board.statuses()
        assert link.state is ComponentState.DEGRADED
        assert "for 42.0s (failed after 300s)" in link.detail
        assert "10.0.0.9:10809 unreachable from the cache" in link.detail
        assert board.ready and board.summary() == ()
        refuse_if_degraded(board, clone(MigrationType.TBC), (ONPREM, CACHE))

        down["down_s"] = 301.0
        await writer.beat()
        await probe.probe()
        assert board.is_failed(WAN_LINK) and not board.ready
        assert board.summary()[0] == "Services not ready or down wan_link"
        for kind in (MigrationType.TBC, MigrationType.COLD):
            with pytest.raises(ServicesDegraded) as refused:
                refuse_if_degraded(board, clone(kind), (ONPREM, CACHE))
            assert refused.value.down == (WAN_LINK,)

        figures["wan_link"] = {"peers": ["10.0.0.9:10809"], "down": {}}
        await writer.beat()
        await probe.probe()
        assert board.is_ok(WAN_LINK) and board.ready

        # A second, short outage: degraded, then restored (never failed).
        figures["wan_link"] = {"peers": ["10.0.0.9:10809"], "down": {"10.0.0.9:10809": down}}
        down["down_s"] = 3.0
        await writer.beat()
        await probe.probe()
        figures["wan_link"] = {"peers": ["10.0.0.9:10809"], "down": {}}
        await writer.beat()
        await probe.probe()
        await asyncio.wait_for(events.written(), 10)
    finally:
        stop.set()
        await writing
    written = [e.kind for e in await EventLog(store).read() if e.fields["component"] == WAN_LINK]
    assert written == [
        HealthEvent.COMPONENT_DEGRADED,
        HealthEvent.COMPONENT_FAILED,
        HealthEvent.COMPONENT_RECOVERED,
        HealthEvent.COMPONENT_DEGRADED,
        HealthEvent.COMPONENT_RESTORED,
    ]
