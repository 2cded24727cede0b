"""Leases with fencing tokens: one owner drives a job at a time, and a stale owner is shut out.

``acquire`` hands out a lease for ``ttl`` with a fencing token that grows every
time the lease changes hands. The holder renews it well before it expires;
when a renewal fails the holder must stop at once (:class:`LeaseKeeper` does
this by cancelling the work). Every write a holder makes carries its token,
and the write scripts refuse tokens that are no longer current, so even a
paused-then-resumed old owner cannot overwrite the new owner's state.
Time is Redis's own clock (``TIME``), so appliances need not agree on theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from redis.typing import EncodableT

from appliance.errors import LeaseLost, StateStoreUnavailable
from appliance.logs import get_logger
from appliance.state.store import StateStore, text

log = get_logger(__name__)

NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: lease, fence. ARGV: owner, ttl_ms. Returns {1, token} or {0, holder}.
_ACQUIRE = (
    NOW_MS
    + """
local holder = redis.call('HGET', KEYS[1], 'owner')
local expires = tonumber(redis.call('HGET', KEYS[1], 'expires') or '0')
if holder and holder ~= ARGV[1] and expires > now then
  return {0, holder}
end
local token
if holder == ARGV[1] and expires > now then
  token = redis.call('HGET', KEYS[1], 'token')
else
  token = tostring(redis.call('INCR', KEYS[2]))
end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'token', token, 'expires', now + tonumber(ARGV[2]))
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
    resource: str
    owner: str
    token: int


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
    """Renews a lease every third of its life; cancels the work the moment renewal fails."""

    def __init__(self, leases: Leases, lease: Lease) -> None:
        self._leases = leases
        self.lease = lease

    async def run(self, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        task = asyncio.create_task(work())
        renewer = asyncio.create_task(self._renew_until_lost(task))
        try:
            await task
        except asyncio.CancelledError:
            if renewer.done() and renewer.result():
                raise LeaseLost(self.lease.resource, self.lease.token) from None
            raise
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer

    async def _renew_until_lost(self, task: asyncio.Task[None]) -> bool:
        period = self._leases.ttl_s / 3
        while True:
            await asyncio.sleep(period)
            try:
                renewed = await self._leases.renew(self.lease)
            except StateStoreUnavailable:
                renewed = False
            if not renewed:
                log.warning("lease lost: stopping work", resource=self.lease.resource)
                task.cancel()
                return True
