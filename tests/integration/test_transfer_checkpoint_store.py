"""The Redis checkpoint store against a real redis-server."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from appliance.embedded import free_port
from appliance.errors import StateStoreUnavailable
from appliance.state.checkpoints import (
    Checkpoint,
    CheckpointMeta,
    ChunkRecord,
    RedisCheckpointStore,
)
from appliance.state.keys import Keys

META = CheckpointMeta(size=10 << 30, chunk_size=1 << 20, hash_name="xxh3-128")


async def test_round_trip_pages_through_every_record(redis: aioredis.Redis, keys: Keys) -> None:
    store = RedisCheckpointStore(redis, keys, "t1")
    assert await store.load() is None
    await store.begin(META)
    records = [
        ChunkRecord(index, 1 + index % 3, None if index % 5 == 0 else index.to_bytes(16, "big"))
        for index in range(2500)
    ]
    await store.record(records[:1200])
    await store.record(records[1200:])
    await store.mark_durable(2)
    await store.forget([3, 4])
    await store.mark_complete(b"\xab" * 16)

    loaded = await store.load()
    assert loaded == Checkpoint(
        META,
        2,
        tuple(r for r in records if r.index not in (3, 4)),
        b"\xab" * 16,
    )
    assert store.key == keys.checkpoint("t1")


async def test_begin_replaces_and_delete_removes(redis: aioredis.Redis, keys: Keys) -> None:
    store = RedisCheckpointStore(redis, keys, "t2")
    await store.begin(META)
    await store.record([ChunkRecord(1, 1, None)])
    await store.mark_durable(1)
    await store.begin(META)
    assert await store.load() == Checkpoint(META, 0, ())
    await store.delete()
    assert await store.load() is None
    assert not await redis.exists(keys.checkpoint("t2"))


async def test_unreachable_redis_raises_state_store_unavailable(keys: Keys) -> None:
    client = aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0")
    store = RedisCheckpointStore(client, keys, "t3", attempts=2, max_backoff_s=0.01)
    try:
        with pytest.raises(StateStoreUnavailable):
            await store.record([ChunkRecord(0, 1, None)])
    finally:
        await client.aclose()
