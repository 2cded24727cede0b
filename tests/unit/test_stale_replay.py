"""A command refused as stale stays refused, however it comes back (resend, DLQ redrive)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import timedelta

import pytest

from appliance.clock import FakeClock
from appliance.dispatch.delivery import Delivery, Verdict
from appliance.dispatch.dispatcher import Dispatcher
from appliance.embedded import RedisServer
from appliance.sink import MemorySink
from appliance.state.commands import CommandRecords
from appliance.state.events import EventLog
from appliance.state.keys import Keys
from appliance.state.store import StateStore, connect
from messages.codec import Decoder, encode
from messages.commands import Command, ResetRequest, ResetRequestBody, SourceInventoryRequest
from messages.errors import ErrorCode
from messages.events import CommandResponse, CommandResponseBody, ErrorResponse, Event

TOKEN = b"stale-token"
SKEW = timedelta(minutes=5)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[Command] = []

    async def __call__(self, command: Command) -> Sequence[Event]:
        self.calls.append(command)
        body = CommandResponseBody(command_type=command.message_type, detail="done")
        return [CommandResponse(correlation_id=command.correlation_id, body=body)]


@pytest.fixture
async def store(redis_server: RedisServer, keys: Keys) -> AsyncIterator[StateStore]:
    store = StateStore(connect(redis_server.url), keys, retry_seconds=0.5, retry_attempts=2)
    yield store
    await store.close()


def _dispatcher(
    store: StateStore, clock: FakeClock, handler: Recorder, sink: MemorySink, lease_s: float
) -> Dispatcher:
    return Dispatcher(
        appliance_id="ferry-test",
        decoder=Decoder(TOKEN),
        # A zero handling lease: any later delivery would be a "takeover" if the record
        # were left "received".
        records=CommandRecords(store, ttl_s=3600, lease_s=lease_s),
        events=EventLog(store),
        sink=sink,
        handlers={"ResetRequest": handler, "SourceInventoryRequest": handler},
        clock=clock,
        max_skew=SKEW,
    )


def _delivery(body: str, n: int) -> Delivery:
    return Delivery(f"sqs-{n}", f"receipt-{n}", body, n)


@pytest.mark.parametrize("offset", [timedelta(days=1), timedelta(minutes=-10)])
@pytest.mark.parametrize("lease_s", [0.0, 60.0])
async def test_a_stale_command_is_refused_on_every_delivery(
    store: StateStore, offset: timedelta, lease_s: float
) -> None:
    clock = FakeClock()
    handler, sink = Recorder(), MemorySink()
    dispatcher = _dispatcher(store, clock, handler, sink, lease_s)
    command = ResetRequest(body=ResetRequestBody(confirm=True), sent_at=clock.now() + offset)
    body = encode(command, TOKEN)

    verdicts = []
    for n in range(1, 4):
        verdicts.append(await dispatcher.handle(_delivery(body, n)))
        clock.advance(60)  # sent again a minute later, and again
    assert verdicts == [Verdict.DEAD_LETTER] * 3
    assert handler.calls == []
    assert [type(e) for e in sink.events] == [ErrorResponse] * 3
    assert {e.body.code for e in sink.events if isinstance(e, ErrorResponse)} == {
        ErrorCode.STALE_MESSAGE
    }
    assert {e.correlation_id for e in sink.events} == {command.correlation_id}
    # The refusal is durable in the command's record.
    record = await store.run(lambda r: r.hgetall(store.keys.command(command.message_id)))
    assert record[b"status"] == b"refused"
    assert record[b"refusal_code"] == b"stale_message"


async def test_a_stale_command_stays_refused_when_its_clock_would_now_pass(
    store: StateStore,
) -> None:
    """Sent 10 min ahead: refused; 10 min later the same bytes would be "fresh": still refused."""
    clock = FakeClock()
    handler, sink = Recorder(), MemorySink()
    dispatcher = _dispatcher(store, clock, handler, sink, 0.0)
    command = SourceInventoryRequest(sent_at=clock.now() + timedelta(minutes=10))
    body = encode(command, TOKEN)
    assert await dispatcher.handle(_delivery(body, 1)) is Verdict.DEAD_LETTER
    clock.advance(600)
    assert await dispatcher.handle(_delivery(body, 2)) is Verdict.DEAD_LETTER
    assert handler.calls == []


async def test_a_fresh_command_is_still_answered_once(store: StateStore) -> None:
    clock = FakeClock()
    handler, sink = Recorder(), MemorySink()
    dispatcher = _dispatcher(store, clock, handler, sink, 0.0)
    body = encode(SourceInventoryRequest(sent_at=clock.now()), TOKEN)
    assert await dispatcher.handle(_delivery(body, 1)) is Verdict.ACK
    clock.advance(600)
    assert await dispatcher.handle(_delivery(body, 2)) is Verdict.ACK
    assert len(handler.calls) == 1


async def test_a_command_sent_far_ahead_is_refused_until_after_its_time(store: StateStore) -> None:
    """Refused 30 days early: the refusal outlives the record TTL (1 h here) and its date."""
    clock = FakeClock()
    handler, sink = Recorder(), MemorySink()
    dispatcher = _dispatcher(store, clock, handler, sink, 0.0)
    command = SourceInventoryRequest(sent_at=clock.now() + timedelta(days=30))
    assert await dispatcher.handle(_delivery(encode(command, TOKEN), 1)) is Verdict.DEAD_LETTER
    ttl = await store.run(lambda r: r.ttl(store.keys.command(command.message_id)))
    assert ttl > (timedelta(days=30) + SKEW).total_seconds()
