"""Transfer checkpoints in Redis: which chunks of a transfer are done, with their hashes.

One hash per transfer at ``Keys.checkpoint(transfer_id)``::

    meta        JSON of CheckpointMeta (disk size, chunk size, hash algorithm)
    durable     highest flush epoch the target has made durable (int)
    complete    hex whole-image digest, once the transfer finished and checked
    <index>     "<epoch>:<hex chunk hash>", or "<epoch>:z" for an all-zero chunk

The transfer engine (appliance.datapath.transfer) decides what the epochs
mean: a chunk recorded with an epoch at or below ``durable`` was flushed at
the target before ``durable`` was written; a higher epoch means "written and
verified, flush pending". Records are written with HSET in batches; loading
pages through the hash with HSCAN to the end, never cut at a limit.
Redis errors are retried with jittered backoff, then raise StateStoreUnavailable.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT, FieldT

from appliance.errors import StateStoreUnavailable
from appliance.retrying import RetryPolicy, retry
from appliance.state.keys import Keys

_META = "meta"
_DURABLE = "durable"
_COMPLETE = "complete"
_ZERO = "z"

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class CheckpointMeta:
    """The layout a checkpoint's chunk indices refer to; a resume with other meta starts over."""

    size: int
    chunk_size: int
    hash_name: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> CheckpointMeta:
        fields = json.loads(text)
        return cls(
            size=int(fields["size"]),
            chunk_size=int(fields["chunk_size"]),
            hash_name=str(fields["hash_name"]),
        )


@dataclass(frozen=True, slots=True)
class ChunkRecord:
    """Chunk ``index`` written and verified in flush epoch ``epoch``.

    ``digest`` is the chunk's hash at the source, or None for an all-zero chunk
    (its hash depends only on its length, so it is not stored).
    """

    index: int
    epoch: int
    digest: bytes | None

    def encode(self) -> str:
        return f"{self.epoch}:{_ZERO if self.digest is None else self.digest.hex()}"

    @classmethod
    def decode(cls, index: int, value: str) -> ChunkRecord:
        epoch, _, digest = value.partition(":")
        return cls(index, int(epoch), None if digest == _ZERO else bytes.fromhex(digest))


@dataclass(frozen=True, slots=True)
class Checkpoint:
    meta: CheckpointMeta
    durable_epoch: int
    records: tuple[ChunkRecord, ...]
    complete_digest: bytes | None = None


class RedisCheckpointStore:
    """The checkpoint of one transfer, kept in one Redis hash."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        transfer_id: str,
        *,
        attempts: int = 6,
        max_backoff_s: float = 5.0,
    ) -> None:
        self._redis = redis
        self._key = keys.checkpoint(transfer_id)
        self._attempts = attempts
        self._max_backoff_s = max_backoff_s

    @property
    def key(self) -> str:
        return self._key

    async def _call(self, operation: Callable[[], Awaitable[T]]) -> T:
        return await retry(
            RetryPolicy(self._attempts, 0.1, self._max_backoff_s),
            operation,
            transient=(RedisConnectionError, RedisTimeoutError),
            give_up=lambda cause, _: StateStoreUnavailable(cause),
        )

    async def load(self) -> Checkpoint | None:
        return await self._call(self._load)

    async def _load(self) -> Checkpoint | None:
        meta: CheckpointMeta | None = None
        durable = 0
        complete: bytes | None = None
        records: list[ChunkRecord] = []
        async for raw_field, raw_value in self._redis.hscan_iter(self._key, count=1000):
            field = _text(raw_field)
            value = _text(raw_value)
            if field == _META:
                meta = CheckpointMeta.from_json(value)
            elif field == _DURABLE:
                durable = int(value)
            elif field == _COMPLETE:
                complete = bytes.fromhex(value)
            else:
                records.append(ChunkRecord.decode(int(field), value))
        if meta is None:
            return None
        records.sort(key=lambda record: record.index)
        return Checkpoint(meta, durable, tuple(records), complete)

    async def begin(self, meta: CheckpointMeta) -> None:
        """Start a fresh checkpoint, replacing whatever was there."""

        async def replace() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._key)
                pipe.hset(self._key, mapping={_META: meta.to_json(), _DURABLE: 0})
                await pipe.execute()

        await self._call(replace)

    async def record(self, records: Sequence[ChunkRecord]) -> None:
        if not records:
            return
        mapping: dict[FieldT, EncodableT] = {
            str(record.index): record.encode() for record in records
        }

        async def write() -> None:
            await self._redis.hset(self._key, mapping=mapping)

        await self._call(write)

    async def forget(self, indices: Sequence[int]) -> None:
        fields = [str(index) for index in indices]
        for first in range(0, len(fields), 1000):
            batch = fields[first : first + 1000]

            async def remove(batch: list[str] = batch) -> None:
                await self._redis.hdel(self._key, *batch)

            await self._call(remove)

    async def mark_durable(self, epoch: int) -> None:
        async def write() -> None:
            await self._redis.hset(self._key, _DURABLE, epoch)

        await self._call(write)

    async def mark_complete(self, digest: bytes) -> None:
        async def write() -> None:
            await self._redis.hset(self._key, _COMPLETE, digest.hex())

        await self._call(write)

    async def delete(self) -> None:
        async def remove() -> None:
            await self._redis.delete(self._key)

        await self._call(remove)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
