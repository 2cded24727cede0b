"""The event log: a Redis Stream per migration and a global one, capped in length."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from appliance.state.store import StateStore, text

GLOBAL_MAXLEN = 100_000
MIGRATION_MAXLEN = 10_000


@dataclass(frozen=True, slots=True)
class EventRecord:
    event_id: str
    kind: str
    at: str
    migration_id: str | None
    fields: dict[str, Any]


def encode_entry(
    kind: str, at: str, migration_id: str | None, fields: dict[str, Any]
) -> dict[str, str]:
    """An event as its stream entry (also written by fenced scripts, with a state change)."""
    return {
        "kind": kind,
        "at": at,
        "migration_id": migration_id or "",
        "fields": json.dumps(fields, default=str),
    }


class EventLog:
    def __init__(self, store: StateStore) -> None:
        self._store = store

    async def append(
        self, kind: str, at: str, migration_id: str | None = None, **fields: Any
    ) -> None:
        """Append to the global stream and, if given, the migration's own stream."""
        entry = encode_entry(kind, at, migration_id, fields)
        keys = self._store.keys

        async def write(r: Any) -> None:
            async with r.pipeline(transaction=False) as pipe:
                pipe.xadd(keys.events, entry, maxlen=GLOBAL_MAXLEN, approximate=True)
                if migration_id:
                    pipe.xadd(
                        keys.migration_events(migration_id),
                        entry,
                        maxlen=MIGRATION_MAXLEN,
                        approximate=True,
                    )
                await pipe.execute()

        await self._store.run(write)

    async def read(self, migration_id: str | None = None, count: int = 100) -> list[EventRecord]:
        """The newest ``count`` events, oldest first."""
        keys = self._store.keys
        key = keys.migration_events(migration_id) if migration_id else keys.events
        rows = await self._store.run(lambda r: r.xrevrange(key, count=count))
        return [_record(event_id, fields) for event_id, fields in reversed(rows or [])]


def _record(
    event_id: bytes | str | None, raw: dict[bytes | str, bytes | str] | None
) -> EventRecord:
    fields = {text(k): text(v) for k, v in (raw or {}).items()}
    return EventRecord(
        event_id=text(event_id or b""),
        kind=fields.get("kind", ""),
        at=fields.get("at", ""),
        migration_id=fields.get("migration_id") or None,
        fields=json.loads(fields.get("fields", "{}")),
    )
