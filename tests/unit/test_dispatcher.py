"""The dispatcher against a real redis-server: idempotency, rejections, secrets, outages."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import structlog

from appliance.clock import FakeClock
from appliance.dispatch.delivery import Delivery, Verdict
from appliance.dispatch.dispatcher import Dispatcher
from appliance.embedded import RedisServer
from appliance.errors import Conflict
from appliance.sink import MemorySink
from appliance.state.commands import CommandRecords
from appliance.state.events import EventLog
from appliance.state.keys import Keys
from appliance.state.store import StateStore, connect
from messages.codec import Decoder, encode, signature_of
from messages.commands import (
    CloneVm,
    Command,
    GuestCredentials,
    SourceCloneRequest,
    SourceCloneRequestBody,
    SourceInventoryRequest,
    StatusRequest,
)
from messages.common import MigrationType
from messages.errors import ErrorCode
from messages.events import CommandResponse, CommandResponseBody, ErrorResponse, Event
from messages.keys import ApplianceKeyPair
from tests.support.redisfields import field_int

TOKEN = b"dispatch-token"


class CountingHandler:
    """Answers every command; counts how often it took effect."""

    def __init__(self) -> None:
        self.calls: list[Command] = []

    async def __call__(self, command: Command) -> Sequence[Event]:
        self.calls.append(command)
        if isinstance(command, StatusRequest) and command.body.request_id == "conflict":
            raise Conflict("that VM is already migrating")
        body = CommandResponseBody(command_type=command.message_type, detail="done")
        return [CommandResponse(correlation_id=command.correlation_id, body=body)]


@pytest.fixture
async def store(redis_server: RedisServer, keys: Keys) -> AsyncIterator[StateStore]:
    store = StateStore(connect(redis_server.url), keys, retry_seconds=0.5, retry_attempts=2)
    yield store
    await store.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def handler() -> CountingHandler:
    return CountingHandler()


@pytest.fixture
def sink() -> MemorySink:
    return MemorySink()


@pytest.fixture
def dispatcher(
    store: StateStore, clock: FakeClock, handler: CountingHandler, sink: MemorySink
) -> Dispatcher:
    return Dispatcher(
        appliance_id="ferry-test",
        decoder=Decoder(TOKEN),
        records=CommandRecords(store, ttl_s=3600),
        events=EventLog(store),
        sink=sink,
        handlers={
            "SourceInventoryRequest": handler,
            "StatusRequest": handler,
            "SourceCloneRequest": handler,
        },
        clock=clock,
        max_skew=timedelta(minutes=5),
    )


def _delivery(body: str, n: int = 1) -> Delivery:
    return Delivery(f"sqs-{n}", f"receipt-{n}", body, 1)


def _signed(command: Command, clock: FakeClock) -> str:
    return encode(command.model_copy(update={"sent_at": clock.now()}), TOKEN)


async def test_the_same_command_delivered_five_times_has_one_effect_and_one_answer(
    dispatcher: Dispatcher,
    handler: CountingHandler,
    sink: MemorySink,
    clock: FakeClock,
    store: StateStore,
) -> None:
    body = _signed(SourceInventoryRequest(), clock)
    verdicts = [await dispatcher.handle(_delivery(body, n)) for n in range(5)]
    assert verdicts == [Verdict.ACK] * 5
    assert len(handler.calls) == 1
    assert len(sink.events) == 1
    events = await EventLog(store).read()
    assert [e.kind for e in events] == ["command"]


async def test_a_redelivery_after_a_crash_before_the_answer_is_answered_once(
    dispatcher: Dispatcher,
    handler: CountingHandler,
    sink: MemorySink,
    clock: FakeClock,
    store: StateStore,
) -> None:
    command = SourceInventoryRequest()
    body = _signed(command, clock)
    # The first delivery got as far as recording the command, then the process died
    # (its handling lease, zero here, has run out).
    await CommandRecords(store, 3600, lease_s=0).claim(
        command.message_id, _digest(body), command.message_type, command.correlation_id, "t"
    )
    clock.advance(600)  # redelivered long after: a recorded command is never "stale"
    assert await dispatcher.handle(_delivery(body)) is Verdict.ACK
    assert await dispatcher.handle(_delivery(body, 2)) is Verdict.ACK
    assert len(handler.calls) == 1
    assert [e.correlation_id for e in sink.events] == [command.correlation_id]


def _digest(body: str) -> str:
    from messages.codec import body_digest

    return body_digest(json.loads(body))


async def test_a_reused_message_id_with_other_content_is_rejected(
    dispatcher: Dispatcher, handler: CountingHandler, sink: MemorySink, clock: FakeClock
) -> None:
    first = SourceInventoryRequest()
    second = StatusRequest(message_id=first.message_id)
    assert await dispatcher.handle(_delivery(_signed(first, clock))) is Verdict.ACK
    assert await dispatcher.handle(_delivery(_signed(second, clock))) is Verdict.DEAD_LETTER
    assert len(handler.calls) == 1
    error = sink.events[-1]
    assert isinstance(error, ErrorResponse)
    assert error.body.code is ErrorCode.MESSAGE_ID_REUSED
    assert error.correlation_id == second.correlation_id


async def test_stale_commands_are_rejected_and_dead_lettered(
    dispatcher: Dispatcher, handler: CountingHandler, sink: MemorySink, clock: FakeClock
) -> None:
    body = _signed(SourceInventoryRequest(), clock)
    clock.advance(301)
    assert await dispatcher.handle(_delivery(body)) is Verdict.DEAD_LETTER
    assert handler.calls == []
    assert isinstance(sink.events[0], ErrorResponse)
    assert sink.events[0].body.code is ErrorCode.STALE_MESSAGE


def _signed_document(document: dict[str, object]) -> str:
    """A body signed with the bus token as it is, whatever it holds."""
    document = {"message_id": "m-signed", "sent_at": "2026-11-21T09:30:00Z", **document}
    document["signature"] = signature_of(document, TOKEN)
    return json.dumps(document)


DEEP = '{"message_type": "SourceInventoryRequest", "correlation_id": "c-deep", "body": ' + (
    "[" * 980 + "]" * 980 + "}"
)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ("not json", None),
        ('{"message_type": "Nope", "correlation_id": "c-1"}', None),
        (SourceInventoryRequest(correlation_id="c-2").to_wire(), None),
        (encode(SourceInventoryRequest(correlation_id="c-3"), b"wrong"), None),
        (DEEP, None),
        (
            _signed_document({"message_type": "Nope", "correlation_id": "c-4"}),
            "unknown_message_type",
        ),
        (
            _signed_document(
                {"message_type": "SourceInventoryRequest", "correlation_id": "c-5", "body": 7}
            ),
            "schema_violation",
        ),
    ],
    ids=[
        "not-json",
        "unsigned-type",
        "unsigned",
        "bad-signature",
        "deep",
        "signed-type",
        "signed-schema",
    ],
)
async def test_poison_is_dead_lettered_and_answered_only_when_authenticated(
    dispatcher: Dispatcher,
    handler: CountingHandler,
    sink: MemorySink,
    body: str,
    code: str | None,
) -> None:
    assert await dispatcher.handle(_delivery(body)) is Verdict.DEAD_LETTER
    assert handler.calls == []
    if code is None:
        assert sink.events == []  # logged and dead-lettered, never answered
    else:
        (answer,) = sink.events
        assert isinstance(answer, ErrorResponse)
        assert answer.body.code.value == code


async def test_a_forger_cannot_fail_another_clients_pending_request(
    dispatcher: Dispatcher, handler: CountingHandler, sink: MemorySink, clock: FakeClock
) -> None:
    """Whoever can write to the queue but has no token gets no signed ErrorResponse with a
    correlation id they chose; the genuine request is then answered normally."""
    pending = SourceInventoryRequest(correlation_id="victim-correlation-id")
    forged = [
        json.dumps({"correlation_id": pending.correlation_id, "message_type": 1}),
        encode(SourceInventoryRequest(correlation_id=pending.correlation_id), b"guess"),
        SourceInventoryRequest(correlation_id=pending.correlation_id).to_wire(),
        '{"correlation_id": "victim-correlation-id", "x": ' + "[" * 100 + "]" * 100 + "}",
    ]
    for n, body in enumerate(forged):
        assert await dispatcher.handle(_delivery(body, n)) is Verdict.DEAD_LETTER
    assert sink.events == []
    assert await dispatcher.handle(_delivery(_signed(pending, clock), 99)) is Verdict.ACK
    (answer,) = sink.events
    assert isinstance(answer, CommandResponse)
    assert answer.correlation_id == pending.correlation_id


async def test_a_signed_command_without_ids_is_refused_not_given_fresh_ones(
    dispatcher: Dispatcher, handler: CountingHandler, sink: MemorySink
) -> None:
    """Defaults for message_id and sent_at would make this replayable forever."""
    for n, missing in enumerate((("message_id",), ("sent_at",), ("message_id", "sent_at"))):
        document = json.loads(SourceInventoryRequest(correlation_id=f"c-ids-{n}").to_wire())
        for name in missing:
            del document[name]
        document["signature"] = signature_of(document, TOKEN)
        assert await dispatcher.handle(_delivery(json.dumps(document), n)) is Verdict.DEAD_LETTER
        assert isinstance(sink.events[-1], ErrorResponse)
        assert sink.events[-1].body.code is ErrorCode.SCHEMA_VIOLATION
        assert all(name in sink.events[-1].body.message for name in missing)
    assert handler.calls == []


async def test_a_rejected_command_gets_its_code_and_is_not_retried(
    dispatcher: Dispatcher, sink: MemorySink, clock: FakeClock
) -> None:
    from messages.commands import StatusRequestBody

    body = _signed(StatusRequest(body=StatusRequestBody(request_id="conflict")), clock)
    assert await dispatcher.handle(_delivery(body)) is Verdict.ACK
    assert isinstance(sink.events[0], ErrorResponse)
    assert sink.events[0].body.code is ErrorCode.CONFLICT


async def test_commands_without_a_handler_get_not_implemented(
    dispatcher: Dispatcher, sink: MemorySink, clock: FakeClock
) -> None:
    from messages.commands import ResetRequest, ResetRequestBody

    body = _signed(ResetRequest(body=ResetRequestBody(confirm=True)), clock)
    assert await dispatcher.handle(_delivery(body)) is Verdict.ACK
    assert isinstance(sink.events[0], ErrorResponse)
    assert sink.events[0].body.code is ErrorCode.NOT_IMPLEMENTED


async def test_secrets_never_reach_logs_redis_or_answers(
    dispatcher: Dispatcher,
    sink: MemorySink,
    clock: FakeClock,
    redis: aioredis.Redis,
    keys: Keys,
) -> None:
    secret = "correct-horse-battery-staple"
    command = SourceCloneRequest(
        body=SourceCloneRequestBody(
            vms=(CloneVm(name="lnx-web-01"),),
            migration_type=MigrationType.COLD,
            guest_credentials=GuestCredentials(
                sealed=ApplianceKeyPair.generate().public.seal_login("root", secret)
            ),
        )
    )
    with structlog.testing.capture_logs() as logs:
        assert await dispatcher.handle(_delivery(_signed(command, clock))) is Verdict.ACK
    assert logs, "the dispatcher logs what it does"
    assert secret not in repr(logs)
    assert all(secret not in event.to_wire() for event in sink.events)
    async for key in redis.scan_iter(match=keys.pattern):
        dump = await redis.dump(key)
        assert dump is not None and secret.encode() not in dump


async def test_a_state_store_outage_leaves_the_command_for_redelivery(
    tmp_path: Path, clock: FakeClock, handler: CountingHandler, sink: MemorySink, keys: Keys
) -> None:
    server = RedisServer(tmp_path / "redis")
    await server.start()
    store = StateStore(connect(server.url), keys, retry_seconds=0.3, retry_attempts=2)
    dispatcher = Dispatcher(
        appliance_id="ferry-test",
        decoder=Decoder(TOKEN),
        records=CommandRecords(store, 3600),
        events=EventLog(store),
        sink=sink,
        handlers={"SourceInventoryRequest": handler},
        clock=clock,
        max_skew=timedelta(minutes=5),
    )
    body = _signed(SourceInventoryRequest(), clock)
    try:
        await server.stop()
        assert await dispatcher.handle(_delivery(body)) is Verdict.RETRY
        assert handler.calls == [] and sink.events == []
        await server.start()
        assert await dispatcher.handle(_delivery(body)) is Verdict.ACK
        assert len(handler.calls) == 1
    finally:
        await store.close()
        await server.stop()


class HeldHandler:
    """An inventory handler that records each call and holds it until ``release`` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.calls: list[Command] = []

    async def __call__(self, command: Command) -> Sequence[Event]:
        self.calls.append(command)
        self.started.set()
        await self.release.wait()
        body = CommandResponseBody(command_type=command.message_type)
        return [CommandResponse(correlation_id=command.correlation_id, body=body)]


def held_dispatcher(
    store: StateStore, clock: FakeClock, sink: MemorySink, lease_s: float
) -> tuple[Dispatcher, HeldHandler]:
    handler = HeldHandler()
    dispatcher = Dispatcher(
        appliance_id="ferry-test",
        decoder=Decoder(TOKEN),
        records=CommandRecords(store, 3600, lease_s=lease_s),
        events=EventLog(store),
        sink=sink,
        handlers={"SourceInventoryRequest": handler},
        clock=clock,
        max_skew=timedelta(minutes=5),
    )
    return dispatcher, handler


async def test_a_duplicate_arriving_while_the_first_is_handled_waits_its_turn(
    store: StateStore, clock: FakeClock, sink: MemorySink
) -> None:
    dispatcher, held = held_dispatcher(store, clock, sink, lease_s=30)
    release, started, calls = held.release, held.started, held.calls
    body = _signed(SourceInventoryRequest(), clock)
    first = asyncio.create_task(dispatcher.handle(_delivery(body, 1)))
    await started.wait()
    assert await dispatcher.handle(_delivery(body, 2)) is Verdict.BUSY
    release.set()
    assert await first is Verdict.ACK
    assert await dispatcher.handle(_delivery(body, 3)) is Verdict.ACK
    assert len(calls) == 1 and len(sink.events) == 1


async def test_a_handler_that_outlives_its_short_lease_keeps_its_claim(
    store: StateStore, clock: FakeClock, sink: MemorySink, redis: aioredis.Redis, keys: Keys
) -> None:
    """The handling lease is short (a crashed handler's command is taken over quickly), so
    a live handler renews it: a duplicate meanwhile is told BUSY, never handled twice."""
    dispatcher, held = held_dispatcher(store, clock, sink, lease_s=0.3)
    release, started, calls = held.release, held.started, held.calls
    command = SourceInventoryRequest()
    body = _signed(command, clock)
    first = asyncio.create_task(dispatcher.handle(_delivery(body, 1)))
    await started.wait()
    key = keys.command(command.message_id)
    claimed_until = await field_int(redis, key, "lease_until")
    async with asyncio.timeout(10):  # renewed past the first lease's end
        while True:
            if await field_int(redis, key, "lease_until") > claimed_until + 300:
                break
            await asyncio.sleep(0.05)
    assert await dispatcher.handle(_delivery(body, 2)) is Verdict.BUSY
    release.set()
    assert await first is Verdict.ACK
    assert len(calls) == 1 and len(sink.events) == 1


async def test_answers_go_to_the_commands_reply_to_and_rejections_only_when_signed(
    dispatcher: Dispatcher, sink: MemorySink, clock: FakeClock
) -> None:
    """The sink is told where each answer goes; the publisher checks the destination. A
    reply_to is only taken from a message whose signature held."""
    answered = SourceInventoryRequest(reply_to="client-a")
    assert await dispatcher.handle(_delivery(_signed(answered, clock), 1)) is Verdict.ACK
    stale = SourceInventoryRequest(reply_to="client-b", sent_at=clock.now() - timedelta(hours=1))
    assert await dispatcher.handle(_delivery(encode(stale, TOKEN), 2)) is Verdict.DEAD_LETTER
    invalid = json.loads(_signed(SourceInventoryRequest(reply_to="client-c"), clock))
    invalid["body"]["page_size"] = -1
    del invalid["signature"]
    resigned = json.dumps({**invalid, "signature": signature_of(invalid, TOKEN)})
    assert await dispatcher.handle(_delivery(resigned, 3)) is Verdict.DEAD_LETTER
    forged = json.loads(_signed(SourceInventoryRequest(reply_to="client-d"), clock))
    forged["body"]["page_size"] = 7  # the signature no longer holds
    assert await dispatcher.handle(_delivery(json.dumps(forged), 4)) is Verdict.DEAD_LETTER
    # The forged one is not answered at all (nobody may fail a request by forging).
    assert [e.message_type for e in sink.events] == ["CommandResponse"] + ["ErrorResponse"] * 2
    assert sink.reply_to == ["client-a", "client-b", "client-c"]
