"""Reading a Redis hash field in a test, typed: present, as text or as a number."""

from __future__ import annotations

import redis.asyncio as aioredis

from appliance.state.store import text


async def field_text(redis: aioredis.Redis, key: str, field: str) -> str:
    value = await redis.hget(key, field)
    assert value is not None, f"{key} has no field {field!r}"
    return text(value)


async def field_int(redis: aioredis.Redis, key: str, field: str) -> int:
    return int(await field_text(redis, key, field))
