"""A heartbeat monitor: follow an appliance's heartbeats and decide when to raise the alarm."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from messages.events import Heartbeat, ReadyStatus


class Outcome(StrEnum):
    COUNT_REACHED = "count_reached"
    MISSED = "missed"
    NOT_READY = "not_ready"


EXIT_CODES = {Outcome.COUNT_REACHED: 0, Outcome.MISSED: 3, Outcome.NOT_READY: 4}


@dataclass(frozen=True, slots=True)
class MonitorResult:
    outcome: Outcome
    beats: int
    last: Heartbeat | None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.outcome]


class HeartbeatMonitor:
    """Stops after ``count`` beats, after ``max_missed`` silent intervals, or on Not Ready."""

    def __init__(
        self,
        interval_s: float,
        *,
        max_missed: int = 3,
        count: int | None = None,
        fail_on_not_ready: bool = False,
    ) -> None:
        self._interval_s = interval_s
        self._max_missed = max_missed
        self._count = count
        self._fail_on_not_ready = fail_on_not_ready

    async def watch(
        self, heartbeats: AsyncIterator[Heartbeat], on_beat: Callable[[Heartbeat], None]
    ) -> MonitorResult:
        # A timeout must not cancel the iterator itself (that would close it), so a
        # pump task feeds a queue and only the queue read is timed.
        queue: asyncio.Queue[Heartbeat] = asyncio.Queue()

        async def pump() -> None:
            async for beat in heartbeats:
                queue.put_nowait(beat)

        pumping = asyncio.create_task(pump())
        try:
            return await self._judge(queue, on_beat)
        finally:
            pumping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pumping

    async def _judge(
        self, queue: asyncio.Queue[Heartbeat], on_beat: Callable[[Heartbeat], None]
    ) -> MonitorResult:
        beats, missed, last = 0, 0, None
        newest: dict[str, datetime] = {}  # per appliance: the latest heartbeat shown
        while True:
            try:
                beat = await asyncio.wait_for(queue.get(), timeout=self._interval_s)
            except TimeoutError:
                missed += 1
                if missed >= self._max_missed:
                    return MonitorResult(Outcome.MISSED, beats, last)
                continue
            appliance = beat.body.appliance_id
            if appliance in newest and beat.sent_at < newest[appliance]:
                continue  # a late delivery (SQS standard queues reorder): older news, not life
            newest[appliance] = beat.sent_at
            beats, missed, last = beats + 1, 0, beat
            on_beat(beat)
            if self._fail_on_not_ready and beat.body.status is ReadyStatus.NOT_READY:
                return MonitorResult(Outcome.NOT_READY, beats, last)
            if self._count is not None and beats >= self._count:
                return MonitorResult(Outcome.COUNT_REACHED, beats, last)
