"""Command records: what makes a command take effect once however often it arrives.

A record is created (atomically, first writer wins) before the command is
acted on and before it is deleted from the queue. It holds the digest of the
command's content, so a retry (same digest) is told from a reused message id
(different digest); whether the command has been answered; and a short
handling lease, so two deliveries of one command that arrive together are
not both handled, while a delivery whose handler died is taken over once its
lease runs out. The lease is short (a crashed handler's command is taken over
within seconds) and renewed by the handler while it works.

A command refused before anyone acted on it (stale: sent too long ago or too far
ahead) is recorded as ``refused``, with the code and reason, in the same atomic
step that creates the record: every later delivery of those bytes (a resend, a
dead-letter redrive) gets the same refusal and is never acted on.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from enum import StrEnum

from redis.typing import EncodableT

from appliance.state.store import Fields, StateStore, text

# KEYS[1] record; ARGV: digest, type, correlation id, received_at, ttl, lease ms, owner,
# refusal code ('' when the first delivery may act), refusal reason
_CLAIM = """
local key = KEYS[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease_until = now + tonumber(ARGV[6])
if redis.call('EXISTS', key) == 0 then
  if ARGV[8] ~= '' then
    redis.call('HSET', key, 'digest', ARGV[1], 'status', 'refused', 'type', ARGV[2],
               'correlation_id', ARGV[3], 'received_at', ARGV[4],
               'refusal_code', ARGV[8], 'refusal_reason', ARGV[9], 'lease_until', '0')
    redis.call('EXPIRE', key, tonumber(ARGV[5]))
    return {'refused', ARGV[1], ARGV[8], ARGV[9]}
  end
  redis.call('HSET', key, 'digest', ARGV[1], 'status', 'received', 'type', ARGV[2],
             'correlation_id', ARGV[3], 'received_at', ARGV[4],
             'owner', ARGV[7], 'lease_until', lease_until)
  redis.call('EXPIRE', key, tonumber(ARGV[5]))
  return {'first', ARGV[1]}
end
local digest = redis.call('HGET', key, 'digest')
if digest ~= ARGV[1] then
  return {'reused', digest}
end
if redis.call('HGET', key, 'status') == 'refused' then
  return {'refused', digest, redis.call('HGET', key, 'refusal_code') or '',
          redis.call('HGET', key, 'refusal_reason') or ''}
end
if redis.call('HGET', key, 'status') == 'answered' then
  return {'answered', digest}
end
if tonumber(redis.call('HGET', key, 'lease_until') or '0') > now then
  return {'busy', digest}
end
redis.call('HSET', key, 'owner', ARGV[7], 'lease_until', lease_until)
return {'takeover', digest}
"""

# KEYS[1] record; ARGV: owner, lease ms
_RENEW = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1]
   or redis.call('HGET', KEYS[1], 'status') ~= 'received' then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'lease_until', now + tonumber(ARGV[2]))
return 1
"""

_RELEASE = """
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'lease_until', '0')
end
return 0
"""


class ClaimResult(StrEnum):
    FIRST = "first"  # no record existed: this delivery acts
    TAKEOVER = "takeover"  # recorded, unanswered, its handler gone: this delivery acts
    BUSY = "busy"  # another delivery is handling it right now: try again later
    ANSWERED = "answered"  # done already: drop this delivery
    REUSED = "reused"  # the message id was used for different content
    REFUSED = "refused"  # refused before anyone acted on it: refuse this delivery too


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a command was refused before it was acted on (an ErrorCode value, in words)."""

    code: str
    reason: str
    keep_s: int = 0  # remember the refusal at least this long (until the bytes are stale for good)


@dataclass(frozen=True, slots=True)
class Claim:
    result: ClaimResult
    owner: str
    refusal: Refusal | None = None  # with REFUSED: the recorded code and reason

    @property
    def acts(self) -> bool:
        return self.result in (ClaimResult.FIRST, ClaimResult.TAKEOVER)


class CommandRecords:
    def __init__(self, store: StateStore, ttl_s: int, lease_s: float = 60.0) -> None:
        self._store = store
        self._ttl_s = ttl_s
        self.lease_s = lease_s
        self._lease_ms = int(lease_s * 1000)
        self._claim = store.redis.register_script(_CLAIM)
        self._renew = store.redis.register_script(_RENEW)
        self._release = store.redis.register_script(_RELEASE)

    async def claim(
        self,
        message_id: str,
        digest: str,
        message_type: str,
        correlation_id: str,
        received_at: str,
        refusal: Refusal | None = None,
    ) -> Claim:
        """Record the command (first delivery) or find its record; ``refusal``: the first
        delivery may not act, and neither may any later one."""
        key = self._store.keys.command(message_id)
        owner = uuid.uuid4().hex
        args: list[EncodableT] = [
            digest,
            message_type,
            correlation_id,
            received_at,
            max(self._ttl_s, refusal.keep_s) if refusal is not None else self._ttl_s,
            self._lease_ms,
            owner,
            refusal.code if refusal is not None else "",
            refusal.reason if refusal is not None else "",
        ]
        result = await self._store.run(lambda r: self._claim(keys=[key], args=args, client=r))
        outcome = ClaimResult(text(result[0]))
        if outcome is ClaimResult.REFUSED:
            return Claim(outcome, owner, Refusal(text(result[2]), text(result[3])))
        return Claim(outcome, owner)

    async def renew(self, message_id: str, claim: Claim) -> bool:
        """Extend our handling lease; False when it is no longer ours (or already answered)."""
        key = self._store.keys.command(message_id)
        args: list[EncodableT] = [claim.owner, self._lease_ms]
        result = await self._store.run(lambda r: self._renew(keys=[key], args=args, client=r))
        return bool(result)

    async def release(self, message_id: str, claim: Claim) -> None:
        """Give up our handling lease early (we were cancelled): a redelivery may take over."""
        key = self._store.keys.command(message_id)
        await self._store.run(lambda r: self._release(keys=[key], args=[claim.owner], client=r))

    async def answered(self, message_id: str, answered_at: str) -> None:
        """Record that the command's answer has been published."""
        key = self._store.keys.command(message_id)
        mapping: Fields = {"status": "answered", "answered_at": answered_at, "lease_until": "0"}
        await self._store.run(lambda r: r.hset(key, mapping=mapping))
