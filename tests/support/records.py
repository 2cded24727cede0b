"""Waiting on a migration's persisted record: woken by Redis each time the record's hash is
written (keyspace notifications), never by a timer.

The record is read once after subscribing, so a change made before the subscription is
not missed, then again on each notification until ``check`` accepts it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from redis.asyncio.client import PubSub

from appliance.orchestrator.record import MigrationRecord, load
from appliance.state.migrations import MigrationStore
from appliance.state.store import StateStore


async def read_record(store: StateStore, migration_id: str) -> MigrationRecord:
    stored = await MigrationStore(store).get(migration_id)
    assert stored is not None, f"no record of {migration_id}"
    return load(stored.record)


async def until_record(
    store: StateStore,
    migration_id: str,
    check: Callable[[MigrationRecord], bool],
    within_s: float = 120.0,
) -> MigrationRecord:
    """The first persisted record of ``migration_id`` that ``check`` accepts (``check`` may
    raise to fail at once); TimeoutError after ``within_s``."""
    redis = store.redis
    await redis.config_set("notify-keyspace-events", "Kh")
    db = redis.connection_pool.connection_kwargs.get("db", 0)
    channel = f"__keyspace@{db}__:{store.keys.migration(migration_id)}"
    pubsub = redis.pubsub()
    await pubsub.subscribe(channel)
    try:
        async with asyncio.timeout(within_s):
            while True:
                record = await read_record(store, migration_id)
                if check(record):
                    return record
                await _next_change(pubsub)
    finally:
        await pubsub.aclose()


async def _next_change(pubsub: PubSub) -> None:
    """Until the next notification (a None is a subscribe confirmation skipped: again)."""
    while await pubsub.get_message(ignore_subscribe_messages=True, timeout=None) is None:
        pass
