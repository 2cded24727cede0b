"""The Redis connection, retried at the edge, and the generation marker.

Every Redis call goes through :meth:`StateStore.run`: connection errors are
retried with jittered exponential backoff up to a bound, then surface as
:class:`~appliance.errors.StateStoreUnavailable` (and the health board says
so). Callers above never see a redis exception.

The generation marker detects a Redis that came back empty: the first start
writes a random generation to Redis and to the data directory; later starts
(and periodic checks) compare the two.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.typing import EncodableT, FieldT

from appliance.errors import StateLost, StateStoreUnavailable
from appliance.health import HealthBoard
from appliance.logs import get_logger
from appliance.retrying import RetryPolicy, retry
from appliance.state.keys import Keys

T = TypeVar("T")
Fields = dict[FieldT, EncodableT]
"""A hash or stream entry as redis-py wants it."""
COMPONENT = "state_store"
log = get_logger(__name__)

_TRANSIENT = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    ConnectionError,
    TimeoutError,
    OSError,
)


def connect(url: str) -> aioredis.Redis:
    """A client whose only retries are ours (redis-py's own are switched off)."""
    return aioredis.from_url(
        url,
        socket_timeout=5,
        socket_connect_timeout=2,
        retry=Retry(NoBackoff(), 0),
        decode_responses=False,
    )


class StateStore:
    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        *,
        health: HealthBoard | None = None,
        retry_seconds: float = 3.0,
        retry_attempts: int = 6,
    ) -> None:
        self.redis = client
        self.keys = keys
        self._health = health
        self._retry_seconds = retry_seconds
        self._retry_attempts = retry_attempts

    async def run(self, operation: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        """Run ``operation`` against Redis with bounded, jittered retries."""
        result = await retry(
            RetryPolicy(self._retry_attempts, 0.05, 1.0, within_s=self._retry_seconds),
            lambda: operation(self.redis),
            transient=_TRANSIENT,
            give_up=self._give_up,
        )
        self._report_ok()
        return result

    async def ping(self) -> None:
        await self.run(lambda r: r.ping())

    def _report_ok(self) -> None:
        if self._health is not None and not self._health.is_ok(COMPONENT):
            self._health.ok(COMPONENT)
            log.info("state store reachable")

    def _give_up(self, cause: BaseException, attempts: int) -> StateStoreUnavailable:
        self._report_failed(cause)
        return StateStoreUnavailable(cause)

    def _report_failed(self, cause: BaseException) -> None:
        if self._health is not None and self._health.is_ok(COMPONENT):
            log.warning("state store unreachable", error=f"{type(cause).__name__}: {cause}")
        if self._health is not None:
            self._health.failed(COMPONENT, f"unreachable: {type(cause).__name__}")

    async def check_generation(self, marker_file: Path) -> str:
        """Compare Redis's generation with ours; initialise both on a first start.

        Raises StateLost when we have run before but Redis no longer knows it.
        """
        expected = marker_file.read_text().strip() if marker_file.exists() else None
        found_raw = await self.run(lambda r: r.get(self.keys.generation))
        found = text(found_raw) if found_raw is not None else None
        if found is None and expected is not None:
            raise StateLost(expected, found)
        if found is None:
            generation = secrets.token_hex(8)
            created = await self.run(lambda r: r.set(self.keys.generation, generation, nx=True))
            if not created:  # another appliance initialised it first
                return await self.check_generation(marker_file)
            found = generation
        if found != expected:
            if expected is not None:
                # Someone reset the shared state deliberately (ResetRequest): follow it.
                log.warning("state store generation changed", expected=expected, found=found)
            _write_marker(marker_file, found)
        return found

    async def adopt_new_generation(self, marker_file: Path) -> str:
        """After a reset: start a fresh generation in Redis and on disk."""
        generation = secrets.token_hex(8)
        await self.run(lambda r: r.set(self.keys.generation, generation))
        _write_marker(marker_file, generation)
        return generation

    async def close(self) -> None:
        await self.redis.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _write_marker(path: Path, generation: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(generation)
    tmp.replace(path)


def text(value: bytes | str) -> str:
    """Redis answers bytes (we never ask it to decode); give them back as text."""
    return value.decode() if isinstance(value, bytes) else value
