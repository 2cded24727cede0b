"""The heartbeat: what the appliance tells the world about itself every interval."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version

from appliance.clock import Clock
from appliance.errors import BusUnavailable, StateStoreUnavailable
from appliance.health import HealthBoard
from appliance.logs import get_logger
from appliance.sink import EventSink
from messages.events import Heartbeat, HeartbeatBody, ReadyStatus

log = get_logger(__name__)
Counts = Callable[[], Awaitable[dict[str, int]]]


def ferry_version() -> str:
    try:
        return version("ferry")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0+unknown"


class HeartbeatPublisher:
    def __init__(
        self,
        *,
        appliance_id: str,
        health: HealthBoard,
        sink: EventSink,
        clock: Clock,
        counts: Counts,
        in_flight: Callable[[], int],
        appliance_key: str,
    ) -> None:
        self._appliance_id = appliance_id
        self._health = health
        self._sink = sink
        self._clock = clock
        self._counts = counts
        self._in_flight = in_flight
        self._appliance_key = appliance_key
        self._started = clock.monotonic()
        self._sequence = 0

    async def compose(self, extra_details: tuple[str, ...] = ()) -> Heartbeat:
        counts: dict[str, int] = {}
        if self._health.is_ok("state_store"):
            with contextlib.suppress(StateStoreUnavailable):
                counts = await self._counts()
        self._health.expire_silent()
        ready = self._health.ready and not extra_details
        body = HeartbeatBody(
            status=ReadyStatus.READY if ready else ReadyStatus.NOT_READY,
            status_details=self._health.summary() + extra_details,
            appliance_id=self._appliance_id,
            sequence=self._sequence,
            uptime_s=round(self._clock.monotonic() - self._started, 3),
            version=ferry_version(),
            components=self._health.statuses(),
            migration_counts=counts,
            commands_in_flight=self._in_flight(),
            appliance_key=self._appliance_key,
        )
        self._sequence += 1
        return Heartbeat(appliance_id=self._appliance_id, body=body)

    async def beat(self, extra_details: tuple[str, ...] = ()) -> None:
        heartbeat = await self.compose(extra_details)
        try:
            await self._sink.publish(heartbeat)
        except BusUnavailable as error:
            log.warning("heartbeat not published", error=str(error))
            return
        log.debug("heartbeat", status=heartbeat.body.status.value, seq=heartbeat.body.sequence)

    async def run(self, interval_s: float, stop: asyncio.Event) -> None:
        """Beat every ``interval_s`` until ``stop``; a last Not Ready beat says we are stopping."""
        while not stop.is_set():
            await self.beat()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval_s)
        await self.beat(("appliance: stopping",))
