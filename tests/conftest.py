"""Fixtures shared by every test group: a real redis-server per session, a key prefix per test."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, settings

from appliance.embedded import RedisServer
from appliance.state.keys import Keys

# Property tests are about correctness, not speed: on a loaded 2-core CI machine a
# per-example deadline only measures the neighbours. Derandomized so that every run
# of the suite tries the same examples (a failure reproduces; nothing flakes).
settings.register_profile(
    "ferry",
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("ferry")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the whole session, stopped by PID at the end."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    asyncio.run(server.start())
    yield server
    asyncio.run(server.stop())


@pytest.fixture
def key_prefix() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def keys(key_prefix: str) -> Keys:
    return Keys(key_prefix)


@pytest.fixture
async def redis(redis_server: RedisServer, keys: Keys) -> AsyncIterator[aioredis.Redis]:
    """A client on the session's redis-server; this test's keys are deleted afterwards."""
    client = aioredis.from_url(redis_server.url)
    yield client
    try:
        async for key in client.scan_iter(match=keys.pattern, count=1000):
            await client.delete(key)
    finally:
        await client.aclose()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path
