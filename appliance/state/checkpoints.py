"""Transfer checkpoints in Redis: which chunks of a transfer are done, with their hashes.

One hash per transfer at ``Keys.checkpoint(transfer_id)``::

    meta        JSON of CheckpointMeta (disk size, chunk size, hash algorithm)
    durable     highest flush round the target has made durable (int)
    complete    hex whole-image digest, once the transfer finished and checked
    <index>     "<round>:<hex chunk hash>", or "<round>:z" for an all-zero chunk

The transfer engine (appliance.datapath.transfer) decides what the rounds
mean: a chunk recorded with a round at or below ``durable`` was flushed at
the target before ``durable`` was written; a higher round means "written and
verified, flush pending". Records are written in batches of at most 1000
fields by one Lua script (which checks the fence first); loading pages through
the hash with HSCAN to the end, never cut at a limit.
Redis errors are retried with jittered backoff, then raise StateStoreUnavailable.

A store made with the migration owner's :class:`~appliance.state.leases.Lease`
is *fenced*: every write is a script that first checks the token
(:data:`~appliance.state.leases.FENCE_CHECK`), so once another process owns
the migration (or the lease expired, or is known lost here) no write of this
store lands; it raises :class:`~appliance.errors.FencedOut` instead.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT

from appliance.errors import StateStoreUnavailable
from appliance.retrying import RetryPolicy, retry
from appliance.state.keys import Keys
from appliance.state.leases import FENCE_CHECK, Lease, check_fenced, fence_keys, fence_token

_META = "meta"
_DURABLE = "durable"
_COMPLETE = "complete"
_ZERO = "z"

_BATCH = 1000  # fields per script call: bounded arguments, never a long-blocking script

# KEYS: lease, fence, checkpoint. ARGV: token, op, then fields (del) or field/value pairs.
# op "begin" replaces the hash, "set" sets fields, "del" removes fields, "drop" deletes it.
_WRITE = (
    FENCE_CHECK
    + """
local op = ARGV[2]
if op == 'begin' or op == 'drop' then
  redis.call('DEL', KEYS[3])
end
if op == 'del' then
  for i = 3, #ARGV do
    redis.call('HDEL', KEYS[3], ARGV[i])
  end
elseif op ~= 'drop' then
  for i = 3, #ARGV, 2 do
    redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
  end
end
return 1
"""
)

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
    """Chunk ``index`` written and verified in flush round ``round``.

    ``digest`` is the chunk's hash at the source, or None for an all-zero chunk
    (its hash depends only on its length, so it is not stored).
    """

    index: int
    round: int
    digest: bytes | None

    def encode(self) -> str:
        return f"{self.round}:{_ZERO if self.digest is None else self.digest.hex()}"

    @classmethod
    def decode(cls, index: int, value: str) -> ChunkRecord:
        flush_round, _, digest = value.partition(":")
        return cls(index, int(flush_round), None if digest == _ZERO else bytes.fromhex(digest))


@dataclass(frozen=True, slots=True)
class Checkpoint:
    meta: CheckpointMeta
    durable_round: int
    records: tuple[ChunkRecord, ...]
    complete_digest: bytes | None = None


class RedisCheckpointStore:
    """The checkpoint of one transfer, kept in one Redis hash; fenced when given a lease."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        transfer_id: str,
        *,
        lease: Lease | None = None,
        attempts: int = 6,
        max_backoff_s: float = 5.0,
    ) -> None:
        self._redis = redis
        self._key = keys.checkpoint(transfer_id)
        self._lease = lease
        self._script_keys = [*fence_keys(keys, lease), self._key]
        self._script = redis.register_script(_WRITE)
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

    async def _write(self, op: str, *items: EncodableT) -> None:
        """One fenced script call (retried on connection errors; a refusal is never retried)."""

        async def write() -> None:
            args: list[EncodableT] = [fence_token(self._lease), op, *items]
            result = await self._script(keys=self._script_keys, args=args, client=self._redis)
            check_fenced(result, self._lease)

        await self._call(write)

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
        await self._write("begin", _META, meta.to_json(), _DURABLE, 0)

    async def record(self, records: Sequence[ChunkRecord]) -> None:
        for first in range(0, len(records), _BATCH):
            pairs: list[EncodableT] = []
            for record in records[first : first + _BATCH]:
                pairs += [str(record.index), record.encode()]
            await self._write("set", *pairs)

    async def forget(self, indices: Sequence[int]) -> None:
        for first in range(0, len(indices), _BATCH):
            await self._write("del", *(str(index) for index in indices[first : first + _BATCH]))

    async def mark_durable(self, flush_round: int) -> None:
        await self._write("set", _DURABLE, flush_round)

    async def mark_complete(self, digest: bytes) -> None:
        await self._write("set", _COMPLETE, digest.hex())

    async def delete(self) -> None:
        await self._write("drop")


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
