"""Command records: what makes a command take effect once however often it arrives.

A record is created (atomically, first writer wins) before the command is
acted on and before it is deleted from the queue; it holds the digest of the
command's content, so a retry (same digest) is told from a reused message id
(different digest), and whether the command has been answered, so a redelivery
after a crash is answered if, and only if, the first delivery was not.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from redis.typing import EncodableT

from appliance.state.store import Fields, StateStore, text

_CLAIM = """
local key = KEYS[1]
if redis.call('EXISTS', key) == 1 then
  return redis.call('HMGET', key, 'digest', 'status')
end
redis.call('HSET', key, 'digest', ARGV[1], 'status', 'received', 'type', ARGV[2],
           'correlation_id', ARGV[3], 'received_at', ARGV[4])
redis.call('EXPIRE', key, tonumber(ARGV[5]))
return false
"""


class CommandStatus(StrEnum):
    RECEIVED = "received"
    ANSWERED = "answered"


@dataclass(frozen=True, slots=True)
class Claim:
    """The outcome of claiming a command id."""

    first: bool  # no record existed: this delivery is the one that acts
    digest: str
    status: CommandStatus


class CommandRecords:
    def __init__(self, store: StateStore, ttl_s: int) -> None:
        self._store = store
        self._ttl_s = ttl_s
        self._claim = store.redis.register_script(_CLAIM)

    async def claim(
        self,
        message_id: str,
        digest: str,
        message_type: str,
        correlation_id: str,
        received_at: str,
    ) -> Claim:
        key = self._store.keys.command(message_id)
        args: list[EncodableT] = [digest, message_type, correlation_id, received_at, self._ttl_s]
        existing = await self._store.run(lambda r: self._claim(keys=[key], args=args, client=r))
        if not existing:
            return Claim(True, digest, CommandStatus.RECEIVED)
        found_digest, status = (text(value) if value is not None else "" for value in existing)
        return Claim(False, found_digest, CommandStatus(status or "received"))

    async def answered(self, message_id: str, answered_at: str) -> None:
        """Record that the command's answer has been published."""
        key = self._store.keys.command(message_id)
        mapping: Fields = {"status": CommandStatus.ANSWERED.value, "answered_at": answered_at}
        await self._store.run(lambda r: r.hset(key, mapping=mapping))
