"""Detection on the health board: HDM's Not Ready line, a component's grace at startup, the
refusal of new operations that need a failed component, and an event per failure and
recovery (kept while the state store is down, written in order once it is back)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from appliance.clock import FakeClock
from appliance.components.heartbeat import ComponentHealth as HeartbeatReader
from appliance.components.heartbeat import HeartbeatWriter
from appliance.components.orders import ComponentId
from appliance.datapath.nbd.server import NbdServer
from appliance.errors import StateStoreUnavailable
from appliance.health import HealthBoard
from appliance.service.health import (
    WAN_LINK,
    HealthEvent,
    HealthEvents,
    ServicesDegraded,
    SiteProbe,
    WanProbe,
    expected_components,
    refuse_if_degraded,
)
from appliance.settings import Settings
from appliance.sites.lab.site import LabSite
from appliance.state.events import EventLog
from appliance.state.keys import Keys
from appliance.state.store import StateStore
from messages.commands import (
    CloneVm,
    GuestCredentials,
    SourceCloneRequest,
    SourceCloneRequestBody,
    StatusRequest,
)
from messages.common import MigrationType
from messages.errors import ErrorCode
from messages.events import ComponentState
from tests.support.lab import MIB, build_lab, lab_vm

CACHE = ComponentId("cache", "cache-1")
ONPREM = ComponentId("onprem", "onprem-1")
PAIR = (ONPREM, CACHE)


def board_with_components(clock: FakeClock) -> HealthBoard:
    board = HealthBoard(clock)
    for name in ("state_store", "state_generation", "bus", "sites"):
        board.register(name)
        board.ok(name)
    for instance in PAIR:
        board.register(str(instance), timeout_s=120)
        board.ok(str(instance), "pid 1")
    return board


def clone(kind: MigrationType) -> SourceCloneRequest:
    body = SourceCloneRequestBody(
        vms=(CloneVm(vm_id="vm-1"),),
        migration_type=kind,
        guest_credentials=GuestCredentials(sealed="x" * 100),
    )
    return SourceCloneRequest(body=body)


def test_not_ready_names_every_component_down_in_hdm_s_words() -> None:
    board = board_with_components(FakeClock())
    assert board.ready and board.summary() == ()
    board.failed(str(CACHE), "no heartbeat for 121.0s (timeout 120s)")
    board.failed("bus", "unreachable")
    assert not board.ready
    assert board.summary() == (
        "Services not ready or down bus, cache/cache-1",
        "bus: unreachable",
        "cache/cache-1: no heartbeat for 121.0s (timeout 120s)",
    )
    board.ok("bus")
    board.ok(str(CACHE))
    assert board.ready and board.summary() == ()


def test_a_component_not_seen_yet_is_starting_until_its_timeout_then_failed() -> None:
    clock = FakeClock()
    board = HealthBoard(clock)
    board.register(str(CACHE), timeout_s=120)
    board.failed(str(CACHE), "no heartbeat")
    assert board.statuses()[0].state is ComponentState.DEGRADED and not board.ready
    clock.advance(119)
    assert board.expire_silent() == []
    clock.advance(2)
    assert board.expire_silent() == [str(CACHE)]
    assert board.is_failed(str(CACHE))


def test_new_tbc_and_warm_migrations_are_refused_while_a_component_is_down() -> None:
    board = board_with_components(FakeClock())
    board.failed(str(CACHE), "no heartbeat")
    for kind in (MigrationType.TBC, MigrationType.WARM):
        with pytest.raises(ServicesDegraded) as refused:
            refuse_if_degraded(board, clone(kind), PAIR)
        assert refused.value.code is ErrorCode.SERVICES_DEGRADED
        assert refused.value.down == (str(CACHE),)
        assert str(refused.value) == (
            "Services not ready or down cache/cache-1: new operations disallowed until they "
            "are back"
        )
    refuse_if_degraded(board, clone(MigrationType.COLD), PAIR)  # cold needs no component
    refuse_if_degraded(board, StatusRequest(), PAIR)  # status is always answered
    board.ok(str(CACHE))
    refuse_if_degraded(board, clone(MigrationType.TBC), PAIR)


def test_a_failed_state_store_or_bus_refuses_every_new_migration() -> None:
    board = board_with_components(FakeClock())
    board.failed("state_store", "unreachable")
    with pytest.raises(ServicesDegraded) as refused:
        refuse_if_degraded(board, clone(MigrationType.COLD), PAIR)
    assert refused.value.down == ("state_store",)


def test_components_not_configured_are_not_needed() -> None:
    board = HealthBoard(FakeClock())
    board.register("state_store")
    board.ok("state_store")
    refuse_if_degraded(board, clone(MigrationType.TBC), PAIR)  # cold-only setup: not ours
    assert expected_components(Settings()) == ()
    both = Settings(embedded_components="cache/cache-1", remote_components=f"{ONPREM},{CACHE}")
    assert expected_components(both) == (CACHE, ONPREM)


class DownFirst(EventLog):
    """The event log, unreachable until ``up`` is set (as Redis down, then back)."""

    def __init__(self, store: StateStore, board: HealthBoard) -> None:
        super().__init__(store)
        self.board = board
        self.up = False
        self.tried = asyncio.Event()

    async def append(
        self, kind: str, at: str, migration_id: str | None = None, **fields: Any
    ) -> None:
        self.tried.set()
        if not self.up:
            self.board.failed("state_store", "unreachable")
            raise StateStoreUnavailable(ConnectionError("down"))
        await super().append(kind, at, migration_id, **fields)


async def test_each_failure_and_recovery_is_an_event_written_once_the_store_is_back(
    redis: aioredis.Redis, keys: Keys
) -> None:
    clock = FakeClock()
    board = board_with_components(clock)
    events = HealthEvents(board, clock)
    store = StateStore(redis, keys)
    log = DownFirst(store, board)
    stop = asyncio.Event()
    task = asyncio.create_task(events.run(log, stop))
    try:
        board.failed(str(CACHE), "no heartbeat for 121.0s (timeout 120s)")
        await asyncio.wait_for(log.tried.wait(), 10)  # the writer tried, and failed
        board.ok(str(CACHE), "pid 2")
        log.up = True
        board.ok("state_store")
        await asyncio.wait_for(events.written(), 10)
    finally:
        stop.set()
        await task
    written = [(e.kind, e.fields["component"]) for e in await log.read()]
    assert written == [
        (HealthEvent.COMPONENT_FAILED, str(CACHE)),
        (HealthEvent.COMPONENT_FAILED, "state_store"),
        (HealthEvent.COMPONENT_RECOVERED, str(CACHE)),
        (HealthEvent.COMPONENT_RECOVERED, "state_store"),
    ]


async def test_the_wan_link_fails_when_the_i_o_manager_s_address_is_unreachable_too_long(
    redis: aioredis.Redis, keys: Keys
) -> None:
    """A real NBD server stands for the I/O manager; its address travels in a real heartbeat."""
    clock = FakeClock()
    board = HealthBoard(clock)
    store = StateStore(redis, keys)
    figures: dict[str, object] = {}
    writer = HeartbeatWriter(store, ONPREM, lambda: figures, interval_s=1, ttl_s=60)
    probe = WanProbe(HeartbeatReader(store, 30), board, ONPREM, interval_s=1, clock=clock)
    await writer.beat()
    await probe.probe()  # no address given: nothing to probe, not held against the link
    assert board.is_ok(WAN_LINK) and "not probed" in board.statuses()[0].detail

    async with NbdServer() as first:
        figures["address"] = str(first.address)
        await writer.beat()
        await probe.probe()
        assert board.is_ok(WAN_LINK) and board.statuses()[0].detail.endswith("reachable")
    await probe.probe()  # closed, but not for the timeout yet: degraded, still Ready
    (link,) = board.statuses()
    assert link.state is ComponentState.DEGRADED and "failed after 30s" in link.detail
    assert board.ready and board.down() == () and not board.is_failed(WAN_LINK)
    refuse_if_degraded(board, clone(MigrationType.TBC), PAIR)  # not a failure: taken
    clock.advance(31)
    await probe.probe()
    assert board.is_failed(WAN_LINK)
    assert f"{first.address} unreachable for 31.0s" in board.statuses()[0].detail
    with pytest.raises(ServicesDegraded) as refused:
        refuse_if_degraded(board, clone(MigrationType.TBC), PAIR)
    assert refused.value.down == (WAN_LINK,)

    async with NbdServer() as second:  # the link is back (here: the I/O manager moved)
        figures["address"] = str(second.address)
        await writer.beat()
        await probe.probe()
        assert board.is_ok(WAN_LINK)


async def test_a_site_that_stops_answering_fails_after_the_timeout_and_refuses_every_migration(
    tmp_path: Path,
) -> None:
    await build_lab(tmp_path, [lab_vm(1, disks=1, disk_size=MIB)])
    site = LabSite.open(tmp_path / "sites" / "onprem")
    clock = FakeClock()
    board = board_with_components(clock)
    probe = SiteProbe(site, board, interval_s=1, timeout_s=30, clock=clock)
    await probe.probe()
    assert board.is_ok("site:onprem")

    config = site.root / "site.json"
    config.rename(site.root / "site.json.away")  # the site's API no longer answers
    await probe.probe()
    assert board.is_ok("site:onprem")  # not for the timeout yet
    clock.advance(31)
    await probe.probe()
    assert board.is_failed("site:onprem")
    assert board.summary()[0] == "Services not ready or down site:onprem"
    with pytest.raises(ServicesDegraded) as refused:
        refuse_if_degraded(board, clone(MigrationType.COLD), PAIR)
    assert refused.value.down == ("site:onprem",)

    (site.root / "site.json.away").rename(config)
    await probe.probe()
    assert board.is_ok("site:onprem") and board.ready
