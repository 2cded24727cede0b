"""Detection: which components the appliance needs, its events when one fails or recovers,
and the refusal of new operations that need a failed one.

The health board (appliance/health.py) holds each component's state: the state store
and the bus from their own probes, the sites once opened, each component (cloud cache,
on-prem I/O manager) from its heartbeat (silent for ``component_timeout_s`` = failed).
The components expected are the configured ones: those the appliance runs itself
(``embedded_components``) and those run on their own hosts (``remote_components``);
a cold-only setup names none and stays Ready without them. Probed the same way
(:class:`Reachability`: failing for the component timeout = failed): each site driver
(``site:<name>``). The WAN link (``wan_link``, :class:`WanProbe`) is judged from what
crosses it: the cloud cache's own probes of the on-prem addresses its disks read
from, else a TCP connect to the I/O manager's address, and while a copy to the cloud
runs, the cloud NBD server as the copy dials it. Down for less than
``wan_down_threshold_s`` the link is *degraded*: listed so, the appliance stays Ready,
misses stall and copies wait; longer, it is *failed* like any component. A new
migration needs the state store, the bus, the sites and the link (once failed); a tbc
or warm one also the ``tbc_components`` pair, when they are among the expected ones.

Every change to or from *failed* is an event in the event log (the global Redis
Stream ``{p}:events``), kinds in :class:`HealthEvent`; events noticed while the state
store is down are written once it is back, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from appliance.clock import Clock
from appliance.components.heartbeat import ComponentHealth as HeartbeatReader
from appliance.components.orders import ComponentId
from appliance.datapath.link import greeted
from appliance.datapath.nbd.channel import TcpAddress
from appliance.errors import CommandRejected, SiteError, StateStoreUnavailable
from appliance.health import ComponentHealth, HealthBoard, not_ready_line
from appliance.logs import get_logger
from appliance.settings import Settings
from appliance.sites.protocol import Site
from appliance.state.events import EventLog
from appliance.state.store import StateStore
from appliance.waiting import first_of
from messages.commands import Command, SourceCloneRequest
from messages.common import MigrationType
from messages.errors import ErrorCode
from messages.events import ComponentState

log = get_logger(__name__)
SYSTEM_WIDE = ("state_store", "state_generation", "bus", "sites")
"""Without these no new migration of any type is taken."""
NEEDS_COMPONENTS = frozenset({MigrationType.TBC, MigrationType.WARM})


class HealthEvent(StrEnum):
    """The event kinds of detection and repair, as written to the event log."""

    COMPONENT_FAILED = "component_failed"
    COMPONENT_RECOVERED = "component_recovered"
    # Repair (appliance/service/repair.py): fields component, attempt(s), seconds, ...
    COMPONENT_REPAIR_STARTED = "component_repair_started"
    COMPONENT_REPAIRED = "component_repaired"
    COMPONENT_REPAIR_GAVE_UP = "component_repair_gave_up"
    COMPONENT_DEGRADED = "component_degraded"
    """Down, but for less than its threshold (the WAN link): tolerated, not a failure."""
    COMPONENT_RESTORED = "component_restored"
    """Back from a tolerated degradation without having failed."""


def tbc_instances(settings: Settings) -> tuple[ComponentId, ...]:
    return tuple(ComponentId.parse(name) for name in settings.tbc_components.split(","))


def expected_components(settings: Settings) -> tuple[ComponentId, ...]:
    """The embedded ones and the remote ones (no duplicates)."""
    names = [n for n in settings.embedded_components.split(",") if n]
    names += [n for n in settings.remote_components.split(",") if n]
    return tuple(ComponentId.parse(name) for name in dict.fromkeys(names))


def watched_elsewhere(settings: Settings) -> tuple[ComponentId, ...]:
    """The expected components the embedded supervisor does not watch."""
    embedded = {n for n in settings.embedded_components.split(",") if n}
    return tuple(i for i in expected_components(settings) if str(i) not in embedded)


def heartbeat_reader(settings: Settings, store: StateStore) -> HeartbeatReader:
    return HeartbeatReader(store, settings.component_timeout_s)


class HealthEvents:
    """Writes an event for each failure and each recovery the board sees."""

    def __init__(self, board: HealthBoard, clock: Clock) -> None:
        self._board = board
        self._clock = clock
        self._pending: asyncio.Queue[tuple[HealthEvent, str, dict[str, Any]]] = asyncio.Queue()
        board.subscribe(self._changed)

    def note(self, kind: HealthEvent, component: str, **fields: object) -> None:
        """An event about a component (a repair's), written in order with the others."""
        at = self._clock.now().isoformat()
        self._pending.put_nowait((kind, at, {"component": component, **fields}))

    def _changed(self, before: ComponentHealth, after: ComponentHealth) -> None:
        if after.state is ComponentState.FAILED:
            log.warning("component failed", component=after.name, detail=after.detail)
            self.note(HealthEvent.COMPONENT_FAILED, after.name, detail=after.detail)
        elif before.state is ComponentState.FAILED and after.state is ComponentState.OK:
            log.info("component recovered", component=after.name, detail=after.detail)
            self.note(HealthEvent.COMPONENT_RECOVERED, after.name, detail=after.detail)
        elif after.tolerated and before.state is ComponentState.OK:
            log.warning("component degraded", component=after.name, detail=after.detail)
            self.note(HealthEvent.COMPONENT_DEGRADED, after.name, detail=after.detail)
        elif before.tolerated and after.state is ComponentState.OK:
            log.info("component restored", component=after.name, detail=after.detail)
            self.note(HealthEvent.COMPONENT_RESTORED, after.name, detail=after.detail)

    async def run(self, events: EventLog, stop: asyncio.Event) -> None:
        while not stop.is_set():
            taken = await first_of(self._pending.get(), stop=stop)
            if taken is None:
                return
            kind, at, fields = taken
            while not await self._write(events, kind, at, fields):
                await first_of(self._board.wait_ok("state_store"), stop=stop)
                if stop.is_set():
                    return
            self._pending.task_done()

    async def written(self) -> None:
        """Until every event noticed so far is in the log."""
        await self._pending.join()

    async def _write(
        self, events: EventLog, kind: HealthEvent, at: str, fields: dict[str, Any]
    ) -> bool:
        try:
            await events.append(kind.value, at, **fields)
        except StateStoreUnavailable:
            return False
        return True


WAN_LINK = "wan_link"
SITE_PREFIX = "site:"
PROBE_CONNECT_S = 5.0


def tcp_address(text: str) -> tuple[str, int] | None:
    host, _, port = text.rpartition(":")
    return (host.strip("[]"), int(port)) if host and port.isdigit() else None


class Reachability:
    """One probed component on the board: ok at each success, failed once the probe has
    failed for longer than ``timeout_s`` (the component timeout) without a success.
    ``degrade``: meanwhile shown as degraded (tolerated: Ready is kept), not left ok."""

    def __init__(
        self,
        board: HealthBoard,
        name: str,
        timeout_s: float,
        clock: Clock,
        *,
        degrade: bool = False,
    ) -> None:
        self.name = name
        self._board = board
        self._timeout_s = timeout_s
        self._clock = clock
        self._degrade = degrade
        self._last_ok = clock.monotonic()
        board.register(name)

    def reached(self, detail: str) -> None:
        self._last_ok = self._clock.monotonic()
        self._board.ok(self.name, detail)

    def unjudged(self) -> None:
        """Nothing to probe now: the time without a success starts again."""
        self._last_ok = self._clock.monotonic()

    def missed(self, what: str, cause: str, *, silent_s: float = 0.0) -> None:
        """A failed probe; ``silent_s``: how long the far end itself has seen it down."""
        silent_s = max(silent_s, self._clock.monotonic() - self._last_ok)
        if silent_s > self._timeout_s:
            self._board.failed(self.name, f"{what} for {silent_s:.1f}s: {cause}")
        elif self._degrade:
            self._board.degraded(
                self.name,
                f"{what} for {silent_s:.1f}s (failed after {self._timeout_s:.0f}s): {cause}",
            )


async def probe_every(
    interval_s: float, probe: Callable[[], Awaitable[None]], stop: asyncio.Event
) -> None:
    while not stop.is_set():
        with contextlib.suppress(StateStoreUnavailable):
            await probe()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval_s)


@dataclass(frozen=True, slots=True)
class LinkSeen:
    """One path across the WAN as last probed: up, down (for ``down_s`` as its far end
    saw it), or nothing to judge."""

    up: bool | None
    detail: str
    down_s: float = 0.0
    cause: str = ""


CopyLink = Callable[[], Awaitable[TcpAddress | None]]
"""The cloud NBD server's address as the data path dials it while a copy runs, else None."""


class WanProbe:
    """The WAN link between the sites, from the paths that cross it:

    * the cloud cache's view (its heartbeat's ``wan_link``: it probes every on-prem
      address its disks read from), when it reports any;
    * else a TCP connect to the I/O manager's address, as its heartbeat gives it (not
      judged while the I/O manager is silent);
    * while a copy to the cloud runs (``copy_link``), an NBD greeting from the cloud
      NBD server at the address the copy dials.

    Any path down: the link is down; degraded for ``threshold_s`` (the WAN threshold),
    failed after."""

    def __init__(
        self,
        reader: HeartbeatReader,
        board: HealthBoard,
        onprem: ComponentId | None,
        *,
        interval_s: float,
        clock: Clock,
        threshold_s: float | None = None,
        cache: ComponentId | None = None,
        copy_link: CopyLink | None = None,
    ) -> None:
        self._reader = reader
        self._onprem = onprem
        self._cache = cache
        self._copy_link = copy_link
        self._interval_s = interval_s
        timeout_s = threshold_s if threshold_s is not None else reader.timeout_s
        self._probe_s = min(PROBE_CONNECT_S, max(1.0, interval_s))
        self._link = Reachability(board, WAN_LINK, timeout_s, clock, degrade=True)

    async def run(self, stop: asyncio.Event) -> None:
        await probe_every(self._interval_s, self.probe, stop)

    async def probe(self) -> None:
        seen = [await self._cache_view()]
        if seen[0] is None:
            seen[0] = await self._onprem_view()
        seen.append(await self._copy_view())
        paths = [s for s in seen if s is not None]
        down = [s for s in paths if s.up is False]
        if down:
            what = ", ".join(s.detail for s in down)
            cause = "; ".join(s.cause for s in down)
            self._link.missed(what, cause, silent_s=max(s.down_s for s in down))
        elif any(s.up for s in paths):
            self._link.reached("; ".join(s.detail for s in paths if s.up))
        elif paths:
            self._link.unjudged()
        else:
            self._link.reached("not probed: nothing crosses it now")

    async def _cache_view(self) -> LinkSeen | None:
        """The cache's own probes of its upstreams; None when it reports none."""
        if self._cache is None:
            return None
        report = await self._reader.report(self._cache)
        figure = report.figures.get("wan_link")
        if report.failed or not isinstance(figure, dict) or not figure.get("peers"):
            return None
        down = figure.get("down")
        if not isinstance(down, dict) or not down:
            return LinkSeen(True, f"{', '.join(map(str, figure['peers']))} reached by the cache")
        infos = {str(peer): info for peer, info in down.items() if isinstance(info, dict)}
        down_s = max((float(i.get("down_s", 0.0)) for i in infos.values()), default=0.0)
        what = f"{', '.join(infos)} unreachable from the cache"
        return LinkSeen(
            False, what, down_s, "; ".join(str(i.get("detail")) for i in infos.values())
        )

    async def _onprem_view(self) -> LinkSeen | None:
        if self._onprem is None:
            return None
        report = await self._reader.report(self._onprem)
        address = tcp_address(str(report.figures.get("address", "")))
        if report.failed:
            return LinkSeen(None, "the I/O manager is silent")
        if address is None:
            return None  # not probed: the I/O manager gives no TCP address
        if (error := await _connect(*address)) is None:
            return LinkSeen(True, f"{address[0]}:{address[1]} reachable")
        return LinkSeen(False, f"{address[0]}:{address[1]} unreachable", cause=error)

    async def _copy_view(self) -> LinkSeen | None:
        if self._copy_link is None:
            return None
        address = await self._copy_link()
        if address is None:
            return None
        if (error := await greeted(address, self._probe_s)) is None:
            return LinkSeen(True, f"cloud data path {address} answers")
        return LinkSeen(False, f"cloud data path {address} unreachable", cause=error)


class SiteProbe:
    """A site driver: does its site answer (its configuration read back)? Not for the
    component timeout: failed. Named ``site:<name>``; every new migration needs both."""

    def __init__(
        self, site: Site, board: HealthBoard, *, interval_s: float, timeout_s: float, clock: Clock
    ) -> None:
        self._site = site
        self._interval_s = interval_s
        self._reach = Reachability(board, f"{SITE_PREFIX}{site.name}", timeout_s, clock)

    async def run(self, stop: asyncio.Event) -> None:
        await probe_every(self._interval_s, self.probe, stop)

    async def probe(self) -> None:
        try:
            config = await self._site.config()
        except (OSError, SiteError, ValueError) as error:
            self._reach.missed("not answering", f"{type(error).__name__}: {error}")
            return
        self._reach.reached(f"{config.name} answers")


async def _connect(host: str, port: int) -> str | None:
    """None when a TCP connection opens, else why not. The connection is aborted at once,
    with no await after it opens: a cancellation (the probe's own timeout firing just as the
    connect completes, or a stop) cannot leave its socket open."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(PROBE_CONNECT_S):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError) as error:
        return f"{type(error).__name__}: {error}"
    finally:
        if writer is not None:
            writer.transport.abort()
    return None


def wan_probe(
    settings: Settings,
    store: StateStore,
    board: HealthBoard,
    clock: Clock,
    copy_link: CopyLink | None = None,
) -> WanProbe:
    """The link's probe: through the tbc pair when they are expected, and the copies."""
    expected = expected_components(settings)
    onprem, cache = tbc_instances(settings)
    return WanProbe(
        heartbeat_reader(settings, store),
        board,
        onprem if onprem in expected else None,
        cache=cache if cache in expected else None,
        copy_link=copy_link,
        interval_s=max(1.0, settings.component_heartbeat_interval_s),
        threshold_s=settings.wan_down_threshold_s,
        clock=clock,
    )


class ServicesDegraded(CommandRejected):
    """A new operation needs a component that is down."""

    def __init__(self, down: Sequence[str]) -> None:
        self.down = tuple(down)
        super().__init__(
            f"{not_ready_line(down)}: new operations disallowed until they are back",
            ErrorCode.SERVICES_DEGRADED,
        )


def refuse_if_degraded(
    board: HealthBoard, command: Command, components: Sequence[ComponentId]
) -> None:
    """Raise :class:`ServicesDegraded` when a new migration needs a component that is not ok:
    the state store, bus and sites for any; the tbc components for a tbc or warm one."""
    if not isinstance(command, SourceCloneRequest):
        return
    names = set(board.names())
    needed = [n for n in names if n in (*SYSTEM_WIDE, WAN_LINK) or n.startswith(SITE_PREFIX)]
    if command.body.migration_type in NEEDS_COMPONENTS:
        needed += [n for n in map(str, components) if n in names]
    down = [n for n in needed if board.is_failed(n)]
    if down:
        raise ServicesDegraded(down)
