"""The control channel: desired orders in Redis that a component reconciles, fenced twice.

The control plane (the appliance holding a migration's lease) writes one order
per disk into the component's ``component-orders`` hash with :data:`_GIVE`, a
Lua script that refuses the order when

* the lease it names is no longer held with the order's token (expired, released
  or taken over: the fence has moved on), or
* the disk already holds an order with a higher token (a newer owner spoke).

and otherwise stores it and appends a notification to ``component-order-events``.
The component (:class:`OrderDesk`) reads every order on start, on every
notification and every reconcile interval; it refuses, a second time, an order
whose token is lower than the highest it ever accepted for the disk (kept in its
data directory, so a Redis restored from an old copy cannot roll it back),
applies the others once each through its :class:`ComponentRuntime`, and records
each outcome in ``component-outcomes`` with a notification the giver waits on
(:meth:`ComponentOrders.wait`: a blocking stream read, never a sleep loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from typing import Any

from redis.typing import EncodableT

from appliance.components.ledger import Ledger
from appliance.components.orders import (
    ComponentId,
    ComponentKeys,
    ComponentRuntime,
    Order,
    OrderOutcome,
    OutcomeCode,
    OutcomeKind,
)
from appliance.errors import (
    ComponentSilent,
    FerryError,
    LeaseLost,
    OrderRefused,
    StaleToken,
    StateStoreUnavailable,
    TransientError,
)
from appliance.logs import get_logger
from appliance.state.store import StateStore, text

log = get_logger(__name__)

STREAM_MAXLEN = 1000
READ_BLOCK_S = 2.0
"""Longest single blocking read: well under the client's 5 s socket timeout."""
FENCED = -1
STALE = -2

# KEYS: orders hash, order events stream, lease hash, fence.
# ARGV: disk id, order JSON, token, stream maxlen.
# Returns {1, ''} stored, {0, ''} the same order was already there,
# {-1, fence token} the lease is not held with this token, {-2, held token} stale.
_GIVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local fence
if redis.call('TYPE', KEYS[4]).ok == 'hash' then
  fence = redis.call('HGET', KEYS[4], 'token')
else
  fence = redis.call('GET', KEYS[4])
end
local expires = tonumber(redis.call('HGET', KEYS[3], 'expires') or '0')
if fence ~= ARGV[3] or redis.call('HGET', KEYS[3], 'token') ~= ARGV[3] or expires <= now then
  return {-1, fence or ''}
end
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current then
  local ok, decoded = pcall(cjson.decode, current)
  local held = ok and type(decoded) == 'table' and tonumber(decoded['token']) or 0
  if held > tonumber(ARGV[3]) then
    return {-2, tostring(held)}
  end
  if current == ARGV[2] then
    return {0, ''}
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'disk', ARGV[1])
return {1, ''}
"""

# KEYS: outcomes hash, outcome events stream, orders hash, refused-outcomes hash.
# ARGV: disk id, outcome JSON, token, stream maxlen.
# Returns 1 recorded, 0 refused: the disk's desired order carries a higher token (a newer
# owner spoke while this component was paused), so this outcome is stale and not recorded.
_PUBLISH = """
local current = redis.call('HGET', KEYS[3], ARGV[1])
if current and tonumber(ARGV[3]) > 0 then
  local ok, decoded = pcall(cjson.decode, current)
  local held = ok and type(decoded) == 'table' and tonumber(decoded['token']) or 0
  if held > tonumber(ARGV[3]) then
    redis.call('HINCRBY', KEYS[4], ARGV[1], 1)
    return 0
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'disk', ARGV[1], 'order_id', ARGV[5],
           'outcome', ARGV[2])
return 1
"""

Entries = list[tuple[bytes, dict[bytes, bytes]]]


async def last_stream_id(store: StateStore, stream: str) -> str:
    """The id of the newest entry (``0-0`` for an empty stream): read after it to miss nothing."""
    newest: Any = await store.run(lambda r: r.xrevrange(stream, count=1))
    return text(newest[0][0]) if newest else "0-0"


async def read_after(store: StateStore, stream: str, after: str, block_s: float) -> Entries:
    """Entries after ``after``, waiting up to ``block_s`` for one to arrive."""
    block_ms = max(1, int(min(block_s, READ_BLOCK_S) * 1000))
    answer: Any = await store.run(lambda r: r.xread({stream: after}, count=100, block=block_ms))
    if not answer:
        return []
    entries: Entries = answer[0][1]
    return entries


async def cancel_read(reading: asyncio.Future[Entries]) -> None:
    """Cancel a blocking read and wait for it to end. redis-py (8.1) can swallow a
    cancellation that lands while the command is being set up, so cancel again until
    the read is over (each wait is short, and it ends by the read's own block bound)."""
    while not reading.done():
        reading.cancel()
        await asyncio.wait({reading}, timeout=0.05)
    if not reading.cancelled():
        reading.exception()  # retrieved, so an error of a read we gave up on is not logged


class ComponentOrders:
    """The control plane's side: give a component orders and wait for their outcomes."""

    def __init__(self, store: StateStore, instance: ComponentId) -> None:
        self._store = store
        self.instance = instance
        self._keys = ComponentKeys(store.keys, instance)
        self._give = store.redis.register_script(_GIVE)

    async def give(self, order: Order) -> bool:
        """Store ``order`` as the disk's desired state; False if it was there already.

        Raises LeaseLost when the order's lease is not held with its token, and
        StaleToken when the disk already holds an order with a higher token.
        """
        keys = [
            self._keys.orders,
            self._keys.order_events,
            self._store.keys.lease(order.lease),
            self._store.keys.fence(order.lease),
        ]
        args: list[EncodableT] = [order.disk_id, order.to_json(), str(order.token), STREAM_MAXLEN]
        code, detail = await self._store.run(lambda r: self._give(keys=keys, args=args, client=r))
        code = int(code)
        if code == FENCED:
            log.warning("order refused: lease lost", instance=str(self.instance), lease=order.lease)
            raise LeaseLost(order.lease, order.token)
        if code == STALE:
            raise StaleToken(order.disk_id, order.token, int(text(detail)))
        log.info(
            "order given",
            instance=str(self.instance),
            disk=order.disk_id,
            action=order.action.value,
            order_id=order.order_id,
            changed=code == 1,
        )
        return code == 1

    async def desired(self, disk_id: str) -> Order | None:
        raw = await self._store.run(lambda r: r.hget(self._keys.orders, disk_id))
        return Order.from_json(raw) if raw is not None else None

    async def outcome(self, disk_id: str) -> OrderOutcome | None:
        raw = await self._store.run(lambda r: r.hget(self._keys.outcomes, disk_id))
        return OrderOutcome.from_json(raw) if raw is not None else None

    async def wait(self, order: Order, timeout_s: float) -> OrderOutcome:
        """The outcome of ``order`` once the component recorded it; ComponentSilent after
        ``timeout_s``; OrderRefused when the disk's desired order is no longer this one
        (and no outcome of it was seen). Waits on the outcome stream, never polls."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        after = await last_stream_id(self._store, self._keys.outcome_events)
        while True:
            found = await self.outcome(order.disk_id)
            if found is not None and found.order_id == order.order_id:
                return found
            desired = await self.desired(order.disk_id)
            if desired is None or desired.order_id != order.order_id:
                # Desired state, not a queue: a replaced order may never be carried out.
                replaced = desired.order_id if desired is not None else "nothing"
                raise OrderRefused(str(self.instance), order.disk_id, f"replaced by {replaced}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ComponentSilent(str(self.instance), order.disk_id, order.order_id, timeout_s)
            entries = await read_after(self._store, self._keys.outcome_events, after, remaining)
            for entry_id, fields in entries:
                after = text(entry_id)
                if text(fields.get(b"order_id", b"")) == order.order_id and b"outcome" in fields:
                    return OrderOutcome.from_json(fields[b"outcome"])  # even if since replaced

    async def give_and_wait(self, order: Order, timeout_s: float) -> OrderOutcome:
        await self.give(order)
        return await self.wait(order, timeout_s)


class OrderDesk:
    """The component's side: reconcile the desired orders through the runtime, once each."""

    def __init__(
        self,
        store: StateStore,
        instance: ComponentId,
        runtime: ComponentRuntime,
        ledger: Ledger,
        *,
        reconcile_interval_s: float,
    ) -> None:
        self._store = store
        self.instance = instance
        self._keys = ComponentKeys(store.keys, instance)
        self._runtime = runtime
        self._ledger = ledger
        self._interval = reconcile_interval_s
        self._invalid_seen: set[str] = set()
        self.counts: dict[str, int] = {kind.value: 0 for kind in OutcomeKind}
        self.stale_outcomes = 0
        """Outcomes not recorded: a newer owner's order had replaced theirs meanwhile."""
        self.ready = asyncio.Event()
        self._record = store.redis.register_script(_PUBLISH)

    async def run(self, stop: asyncio.Event) -> None:
        """Reconcile everything, then every notified disk, and everything again each interval."""
        after = await self._start(stop)
        loop = asyncio.get_running_loop()
        next_full = loop.time() + self._interval
        while not stop.is_set():
            try:
                entries = await self._next_events(after, stop, next_full)
                if entries is None:
                    await self.reconcile_all()
                    next_full = loop.time() + self._interval
                    continue
                if entries:
                    after = text(entries[-1][0])
                for disk in sorted({text(fields[b"disk"]) for _, fields in entries}):
                    await self.reconcile_disk(disk)
            except StateStoreUnavailable as error:
                log.warning("state store unreachable; orders wait", error=str(error))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=1.0)
                next_full = loop.time()

    async def _start(self, stop: asyncio.Event) -> str:
        """The stream position to read on from, after a first full reconcile."""
        while not stop.is_set():
            try:
                after = await last_stream_id(self._store, self._keys.order_events)
                await self.reconcile_all()
            except StateStoreUnavailable as error:
                log.warning("state store unreachable at start; retrying", error=str(error))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=1.0)
                continue
            self.ready.set()
            return after
        return "$"

    async def _next_events(self, after: str, stop: asyncio.Event, until: float) -> Entries | None:
        """Notifications after ``after``; None when the full reconcile is due; [] on stop."""
        loop = asyncio.get_running_loop()
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                remaining = until - loop.time()
                if remaining <= 0:
                    return None
                reading = asyncio.ensure_future(
                    read_after(self._store, self._keys.order_events, after, remaining)
                )
                await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not reading.done():
                    await cancel_read(reading)
                    return []
                entries = reading.result()
                if entries:
                    return entries
            return []
        finally:
            stopping.cancel()

    async def reconcile_all(self) -> None:
        orders = await self._store.run(lambda r: r.hgetall(self._keys.orders))
        outcomes = await self._store.run(lambda r: r.hgetall(self._keys.outcomes))
        published = {text(disk): OrderOutcome.from_json(raw) for disk, raw in outcomes.items()}
        for disk_raw, raw in sorted(orders.items()):
            disk = text(disk_raw)
            await self._reconcile(disk, raw, published.get(disk))

    async def reconcile_disk(self, disk: str) -> None:
        raw = await self._store.run(lambda r: r.hget(self._keys.orders, disk))
        if raw is not None:
            await self._reconcile(disk, raw, None)

    async def _reconcile(self, disk: str, raw: bytes | str, published: OrderOutcome | None) -> None:
        try:
            order = Order.from_json(raw)
            if order.disk_id != disk:
                raise ValueError(f"order for disk {order.disk_id} stored under {disk}")
        except ValueError as error:
            await self._refuse_invalid(disk, raw, str(error))
            return
        entry = self._ledger.get(disk)
        if entry is not None and entry.outcome is not None and entry.handled(order.order_id):
            if published is None or published.order_id != order.order_id:
                await self._publish(entry.outcome)  # recorded here, lost on the way to Redis
            return
        highest = self._ledger.highest_token(disk)
        if order.token < highest:
            outcome = OrderOutcome.refused(
                order, OutcomeCode.STALE_TOKEN, str(StaleToken(disk, order.token, highest))
            )
        else:
            await self._ledger.accept(disk, order.token)
            outcome = await self._apply(order)
        await self._ledger.record(outcome)
        await self._publish(outcome)

    async def _apply(self, order: Order) -> OrderOutcome:
        bound = log.bind(instance=str(self.instance), disk=order.disk_id, action=order.action.value)
        try:
            outcome = await self._runtime.apply(order)
        except StaleToken as error:
            outcome = OrderOutcome.refused(order, OutcomeCode.STALE_TOKEN, str(error))
        except TransientError as error:
            outcome = OrderOutcome.failed(order, str(error), retryable=True)
        except FerryError as error:
            outcome = OrderOutcome.failed(order, str(error))
        except Exception as error:
            # A bug in a runtime: say so on the channel rather than die in a restart loop.
            bound.exception("order failed unexpectedly")
            outcome = OrderOutcome.failed(order, f"{type(error).__name__}: {error}")
        bound.info("order handled", outcome=outcome.kind.value, reason=outcome.reason)
        return outcome

    async def _refuse_invalid(self, disk: str, raw: bytes | str, reason: str) -> None:
        digest = hashlib.sha256(raw if isinstance(raw, bytes) else raw.encode()).hexdigest()[:24]
        if digest in self._invalid_seen:
            return
        self._invalid_seen.add(digest)
        log.warning("invalid order", instance=str(self.instance), disk=disk, reason=reason)
        outcome = OrderOutcome(
            digest, disk, OutcomeKind.REFUSED, 0, OutcomeCode.INVALID, reason[:500]
        )
        await self._publish(outcome)

    async def _publish(self, outcome: OrderOutcome) -> None:
        """Record the outcome and wake its waiter, unless a newer owner's order (a higher
        token) replaced the one it answers: then it is refused (counted per disk)."""
        keys = [
            self._keys.outcomes,
            self._keys.outcome_events,
            self._keys.orders,
            self._keys.outcomes_refused,
        ]
        args: list[EncodableT] = [
            outcome.disk_id,
            outcome.to_json(),
            outcome.token,
            STREAM_MAXLEN,
            outcome.order_id,
        ]
        recorded = await self._store.run(lambda r: self._record(keys=keys, args=args, client=r))
        if int(recorded):
            self.counts[outcome.kind.value] += 1
            return
        self.stale_outcomes += 1
        log.warning(
            "outcome refused: stale token",
            instance=str(self.instance),
            disk=outcome.disk_id,
            token=outcome.token,
        )
