"""Leases with fencing tokens: one owner drives a job at a time, and a stale owner is shut out.

``acquire`` hands out a lease for ``ttl`` with a fencing token that grows every
time the lease changes hands. The holder renews it well before it expires;
when a renewal fails the holder must stop at once (:class:`LeaseKeeper` does
this by cancelling the work). Every write a holder makes carries its token:
the write scripts start with :data:`FENCE_CHECK`, which refuses (and counts) a
token that is no longer the newest or whose lease has expired, so even a
paused-then-resumed old owner cannot overwrite the new owner's state. A
refusal raises :class:`~appliance.errors.FencedOut` and marks the
:class:`Lease` lost, so every other writer of the same owner stops before it
even asks Redis, and the keeper cancels the work.

The lease key expires in Redis itself (``PEXPIRE``): a crashed owner leaves
nothing behind. The fence key never expires, so tokens only ever grow; it
also counts accepted and refused writes per token (``accepted:<token>``,
``refused:<token>``), the audit trail that tests read.
Time is Redis's own clock (``TIME``), so appliances need not agree on theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from redis.typing import EncodableT

from appliance.errors import FencedOut, LeaseLost, StateStoreUnavailable
from appliance.logs import get_logger
from appliance.state.keys import Keys
from appliance.state.store import StateStore, text

log = get_logger(__name__)

NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

FENCED_OUT = -1
"""What a fenced script answers when it refused the write."""

FENCE_CHECK = """
if ARGV[1] ~= '' then
  local t = redis.call('TIME')
  local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local expires = tonumber(redis.call('HGET', KEYS[1], 'expires') or '0')
  if redis.call('HGET', KEYS[2], 'token') ~= ARGV[1]
     or redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] or expires <= now_ms then
    redis.call('HINCRBY', KEYS[2], 'refused:' .. ARGV[1], 1)
    return -1
  end
  redis.call('HINCRBY', KEYS[2], 'accepted:' .. ARGV[1], 1)
end
"""
"""The start of every fenced write script. KEYS[1]: lease, KEYS[2]: fence; ARGV[1]: the
writer's token ('' for an unfenced write, made by code that owns no lease: creation).
The write goes ahead only while the token is the newest one handed out and its lease
has not expired; the script's own keys and arguments start at KEYS[3] and ARGV[2]."""

# KEYS: lease, fence. ARGV: owner, ttl_ms. Returns {1, token} or {0, holder}.
_ACQUIRE = (
    NOW_MS
    + """
local holder = redis.call('HGET', KEYS[1], 'owner')
local expires = tonumber(redis.call('HGET', KEYS[1], 'expires') or '0')
if holder and holder ~= ARGV[1] and expires > now then
  return {0, holder}
end
if redis.call('TYPE', KEYS[2]).ok == 'string' then  -- a counter left by an older version
  local last = redis.call('GET', KEYS[2])
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[2], 'token', last)
end
local token
if holder == ARGV[1] and expires > now then
  token = redis.call('HGET', KEYS[1], 'token')
else
  token = tostring(redis.call('HINCRBY', KEYS[2], 'token', 1))
end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'token', token, 'expires', now + tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {1, token}
"""
)

# KEYS: lease. ARGV: owner, token, ttl_ms. Returns 1 when renewed.
_RENEW = (
    NOW_MS
    + """
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1]
   and redis.call('HGET', KEYS[1], 'token') == ARGV[2]
   and tonumber(redis.call('HGET', KEYS[1], 'expires') or '0') > now then
  redis.call('HSET', KEYS[1], 'expires', now + tonumber(ARGV[3]))
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
return 0
"""
)

_RELEASE = """
if redis.call('HGET', KEYS[1], 'token') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""


@dataclass(frozen=True, slots=True)
class Lease:
    """A lease as its holder knows it; once marked lost, every fenced write refuses at once."""

    resource: str
    owner: str
    token: int
    _lost: asyncio.Event = field(default_factory=asyncio.Event, compare=False, repr=False)

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def mark_lost(self) -> None:
        self._lost.set()

    async def wait_lost(self) -> None:
        await self._lost.wait()

    def check(self) -> None:
        """Raise FencedOut if this lease is known to be lost: no write should even be tried."""
        if self.lost:
            raise FencedOut(self.resource, self.token)


def fence_keys(keys: Keys, lease: Lease | None) -> list[str]:
    """KEYS[1] and KEYS[2] of a fenced script (an unfenced write never reads them)."""
    resource = lease.resource if lease is not None else "-"
    return [keys.lease(resource), keys.fence(resource)]


def fence_token(lease: Lease | None) -> str:
    """ARGV[1] of a fenced script; raises FencedOut at once for a lease known to be lost."""
    if lease is None:
        return ""
    lease.check()
    return str(lease.token)


def check_fenced(result: object, lease: Lease | None) -> None:
    """After a fenced script: a refusal marks the lease lost and raises FencedOut."""
    if lease is not None and isinstance(result, int) and result == FENCED_OUT:
        lease.mark_lost()
        log.warning("fenced write refused", resource=lease.resource, token=lease.token)
        raise FencedOut(lease.resource, lease.token)


class Leases:
    def __init__(self, store: StateStore, owner: str, ttl_s: float) -> None:
        self._store = store
        self.owner = owner
        self.ttl_s = ttl_s
        self._acquire = store.redis.register_script(_ACQUIRE)
        self._renew = store.redis.register_script(_RENEW)
        self._release = store.redis.register_script(_RELEASE)

    @property
    def _ttl_ms(self) -> int:
        return int(self.ttl_s * 1000)

    async def acquire(self, resource: str) -> Lease | None:
        keys = [self._store.keys.lease(resource), self._store.keys.fence(resource)]
        got, value = await self._store.run(
            lambda r: self._acquire(keys=keys, args=[self.owner, self._ttl_ms], client=r)
        )
        if int(got) != 1:
            return None
        return Lease(resource, self.owner, int(text(value)))

    async def renew(self, lease: Lease) -> bool:
        key = self._store.keys.lease(lease.resource)
        args: list[EncodableT] = [lease.owner, str(lease.token), self._ttl_ms]
        renewed = await self._store.run(lambda r: self._renew(keys=[key], args=args, client=r))
        return int(renewed) == 1

    async def release(self, lease: Lease) -> None:
        key = self._store.keys.lease(lease.resource)
        await self._store.run(
            lambda r: self._release(keys=[key], args=[str(lease.token)], client=r)
        )

    async def holder(self, resource: str) -> str | None:
        value = await self._store.run(lambda r: r.hget(self._store.keys.lease(resource), "owner"))
        return text(value) if value is not None else None


class LeaseKeeper:
    """Renews a lease every third of its life; cancels the work the moment the lease is lost.

    Lost means: a renewal refused, failed, or not answered before the lease would
    have expired, or a fenced write refused anywhere (that marks the lease lost).
    The lease is marked lost *before* the work is cancelled, so whatever the work
    tries to write while it unwinds (a last checkpoint sync) is refused at once.
    """

    def __init__(self, leases: Leases, lease: Lease) -> None:
        self._leases = leases
        self.lease = lease

    async def run(self, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        task = asyncio.create_task(work())
        renewer = asyncio.create_task(self._renew_until_lost(task))
        try:
            await task
        except asyncio.CancelledError:
            if renewer.done() and not renewer.cancelled() and renewer.result():
                raise LeaseLost(self.lease.resource, self.lease.token) from None
            raise
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer

    async def _renew_until_lost(self, task: asyncio.Task[None]) -> bool:
        ttl = self._leases.ttl_s
        valid_until = time.monotonic() + ttl
        while not self.lease.lost:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.lease.wait_lost(), ttl / 3)
            if self.lease.lost:
                break
            asked = time.monotonic()
            if not await self._renew_before(valid_until):
                self.lease.mark_lost()
                break
            valid_until = asked + ttl
        log.warning("lease lost: stopping work", resource=self.lease.resource)
        task.cancel()
        return True

    async def _renew_before(self, deadline: float) -> bool:
        """Renew, unless the lease would expire before Redis answers (a slow answer is a no)."""
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                return await self._leases.renew(self.lease)
        except (StateStoreUnavailable, TimeoutError):
            return False
