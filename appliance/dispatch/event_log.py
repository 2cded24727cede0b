"""``EventsRequest``: the event log (the global Redis Stream, or one migration's) on the wire."""

from __future__ import annotations

from collections.abc import Sequence

from appliance.dispatch.inventory import ENVELOPE_ALLOWANCE
from appliance.state.events import EventLog, EventRecord
from messages.commands import Command, EventsRequest
from messages.events import Event, EventsResponse, EventsResponseBody, LoggedEvent

SCAN_LIMIT = 10_000
"""With a kind filter, how many of the newest entries are looked through."""


def _wire(record: EventRecord) -> LoggedEvent:
    return LoggedEvent(
        event_id=record.event_id,
        kind=record.kind[:64],
        at=record.at[:64],
        migration_id=record.migration_id[:128] if record.migration_id else None,
        fields=record.fields,
    )


class EventsQuery:
    def __init__(self, appliance_id: str, events: EventLog, max_message_bytes: int) -> None:
        self._appliance_id = appliance_id
        self._events = events
        self._budget = max_message_bytes - ENVELOPE_ALLOWANCE

    async def answer(self, command: Command) -> Sequence[Event]:
        assert isinstance(command, EventsRequest)
        return [
            EventsResponse(
                appliance_id=self._appliance_id,
                correlation_id=command.correlation_id,
                body=await self.body(command),
            )
        ]

    async def body(self, command: EventsRequest) -> EventsResponseBody:
        """The newest matching events, oldest first; the oldest dropped until they fit."""
        wanted = command.body
        scan = min(SCAN_LIMIT, wanted.count * 10) if wanted.kinds else wanted.count
        records = await self._events.read(wanted.migration_id, count=scan)
        if wanted.kinds:
            records = [r for r in records if r.kind in wanted.kinds]
        events = [_wire(r) for r in records[-wanted.count :]]
        truncated = False
        while True:
            body = EventsResponseBody(events=tuple(events), truncated=truncated)
            if len(events) <= 1 or len(body.model_dump_json()) <= self._budget:
                return body
            events = events[len(events) // 2 :]
            truncated = True
