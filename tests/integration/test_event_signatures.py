"""Events are Ed25519-signed by the appliance; clients drop what does not verify; guest
credentials cross SQS and rest in the dead-letter queue only sealed. LocalStack + Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest
from aiobotocore.session import get_session

from appliance import logs
from appliance.keys import load_or_create
from clients.client import FerryClient, FerryError
from messages.codec import Decoder, Trust, encode, signature_of
from messages.commands import CloneVm, SourceCloneRequest, SourceCloneRequestBody, StatusRequest
from messages.common import MigrationType
from messages.envelope import utcnow
from messages.errors import ErrorCode
from messages.events import ErrorResponse, ErrorResponseBody, Event, Heartbeat, StatusResponse
from messages.keys import ApplianceKeyPair, AppliancePublicKey
from tests.integration.conftest import TOKEN, Harness, RunningAppliance

StartAppliance = Callable[..., Awaitable[RunningAppliance]]
USERNAME = "guest-admin-in-the-clear-nowhere"
PASSWORD = "guest-password-in-the-clear-nowhere"


class Dropped(logging.Handler):
    """Sets an event when the client logs that it dropped a message that does not verify."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []
        self.changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.changed.set()

    async def until(self, count: int, within_s: float = 20) -> None:
        async with asyncio.timeout(within_s):
            while len(self.records) < count:
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
def dropped() -> Any:
    handler = Dropped()
    logger = logging.getLogger("clients.client")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


async def _sqs(harness: Harness) -> Any:
    return get_session().create_client(
        "sqs", endpoint_url=harness.endpoint, region_name="us-east-1",
        aws_access_key_id="test", aws_secret_access_key="test",
    )  # fmt: skip


async def _raw_heartbeat(harness: Harness, queue: str) -> dict[str, Any]:
    """The first heartbeat on the response queue, as the bytes SQS holds."""
    async with await _sqs(harness) as sqs:
        url = (await sqs.get_queue_url(QueueName=queue))["QueueUrl"]
        async with asyncio.timeout(20):
            while True:
                response = await sqs.receive_message(
                    QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1
                )
                for message in response.get("Messages", []):
                    document: dict[str, Any] = json.loads(message["Body"])
                    if document["message_type"] == "Heartbeat":
                        return document


async def test_events_verify_against_the_key_in_the_data_dir_and_runtime_json(
    harness: Harness, start_appliance: StartAppliance
) -> None:
    running = await start_appliance(harness.settings())
    assert logs.SECRETS.scrub(f"t={TOKEN}") == f"t={logs.MASK}"  # registered at start
    public = load_or_create(harness.data_dir).public
    runtime = json.loads((harness.data_dir / "runtime.json").read_text())
    assert runtime["appliance_key"] == public.text
    key_file = harness.data_dir / "appliance-key.json"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert TOKEN not in key_file.read_text()
    document = await _raw_heartbeat(harness, running.settings.response_queue)
    assert len(document["signature"]) == 128  # Ed25519, not the bus token's HMAC
    assert document["body"]["appliance_key"] == public.text
    heartbeat = Decoder(Trust(appliance_key=public), accept=(Event,)).decode(json.dumps(document))
    assert isinstance(heartbeat, Heartbeat)
    # The bus token cannot stand in for the appliance's key.
    with pytest.raises(Exception) as caught:
        Decoder(Trust(bus_token=TOKEN.encode()), accept=(Event,)).decode(json.dumps(document))
    assert getattr(caught.value, "code", None) is ErrorCode.BAD_SIGNATURE


async def test_a_forged_answer_is_dropped_and_the_genuine_one_arrives(
    harness: Harness, start_appliance: StartAppliance, dropped: Dropped
) -> None:
    """A client holding the bus token fails another client's request no longer: neither an
    HMAC-signed nor a wrongly keyed ErrorResponse is believed."""
    running = await start_appliance(harness.settings())
    command = StatusRequest()
    forged = ErrorResponse(
        correlation_id=command.correlation_id,
        appliance_id=running.settings.appliance_id,
        body=ErrorResponseBody(code=ErrorCode.CONFLICT, message="forged"),
    )
    with_token = forged.wire_dict()
    with_token["signature"] = signature_of(with_token, TOKEN)
    bodies = [json.dumps(with_token), encode(forged, ApplianceKeyPair.generate()), forged.to_wire()]
    async with await _sqs(harness) as sqs:
        url = (await sqs.get_queue_url(QueueName=running.settings.response_queue))["QueueUrl"]
        for body in bodies:
            await sqs.send_message(QueueUrl=url, MessageBody=body)
    # On the shared response queue (no private reply queue), where the forgeries wait.
    async with FerryClient(harness.client_settings(), private_queue=False) as client:
        pending = asyncio.create_task(client.request(command, timeout_s=30))
        await dropped.until(len(bodies))  # read (and disbelieved) while the answer is awaited
        try:
            answer = await pending
        except FerryError as error:  # pragma: no cover - what the forger wanted
            raise AssertionError(f"a forged answer was believed: {error}") from error
        assert isinstance(answer, StatusResponse)
    assert all("does not verify" in record.getMessage() for record in dropped.records)
    assert {record.getMessage().split("(")[1].split(":")[0] for record in dropped.records} == {
        "bad_signature",
        "missing_signature",
    }


def test_a_client_without_a_pinned_key_does_not_run(harness: Harness) -> None:
    settings = harness.client_settings().model_copy(update={"appliance_key": None})
    with pytest.raises(ValueError, match="appliance key"):
        FerryClient(settings)


async def test_a_client_pinned_to_another_key_believes_nothing(
    harness: Harness, start_appliance: StartAppliance, dropped: Dropped
) -> None:
    await start_appliance(harness.settings())
    other = ApplianceKeyPair.generate().public.text
    settings = harness.client_settings().model_copy(update={"appliance_key": other})
    async with FerryClient(settings) as client:
        follow = asyncio.ensure_future(anext(aiter(client.heartbeats())))
        try:
            await dropped.until(1)  # the appliance's heartbeats, dropped
            assert not follow.done(), "a heartbeat signed by another key was believed"
        finally:
            follow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follow
    assert "bad_signature" in dropped.records[0].getMessage()


async def _dead_letters(harness: Harness, queue: str, expect: int) -> AsyncIterator[str]:
    async with await _sqs(harness) as sqs:
        url = (await sqs.get_queue_url(QueueName=queue))["QueueUrl"]
        seen = 0
        async with asyncio.timeout(30):
            while seen < expect:
                response = await sqs.receive_message(
                    QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1
                )
                for message in response.get("Messages", []):
                    seen += 1
                    yield message["Body"]


async def test_dead_lettered_requests_hold_credentials_only_sealed(
    harness: Harness, start_appliance: StartAppliance
) -> None:
    running = await start_appliance(harness.settings())
    public = AppliancePublicKey.parse(harness.appliance_key)
    sealed = public.seal_login(USERNAME, PASSWORD)

    def request(**envelope: object) -> SourceCloneRequest:
        body = SourceCloneRequestBody(
            vms=(CloneVm(name="lnx-web-01"),),
            migration_type=MigrationType.COLD,
            guest_credentials={"sealed": sealed},  # type: ignore[arg-type]
        )
        return SourceCloneRequest(body=body, **envelope)  # type: ignore[arg-type]

    stale = encode(request(sent_at=utcnow() - timedelta(hours=1)), TOKEN)
    tampered = json.loads(encode(request(), TOKEN))
    tampered["body"]["migration_type"] = "warm"
    unsigned = request().to_wire()
    bodies = [stale, json.dumps(tampered), unsigned]
    async with FerryClient(harness.client_settings()) as client:
        for body in bodies:
            await client.send_raw(body)
        dead = [
            body async for body in _dead_letters(harness, running.settings.dead_letter_queue, 3)
        ]
    assert sorted(dead) == sorted(bodies)
    for body in dead:
        assert PASSWORD not in body and USERNAME not in body
        assert json.loads(body)["body"]["guest_credentials"] == {"sealed": sealed}


async def test_credentials_sealed_to_another_key_are_an_invalid_credentials_answer(
    harness: Harness, start_appliance: StartAppliance
) -> None:
    await start_appliance(harness.settings())
    async with FerryClient(harness.client_settings()) as client:
        stranger = ApplianceKeyPair.generate().public.seal_login(USERNAME, PASSWORD)
        command = SourceCloneRequest(
            body=SourceCloneRequestBody(
                vms=(CloneVm(name="lnx-web-01"),),
                migration_type=MigrationType.COLD,
                guest_credentials={"sealed": stranger},  # type: ignore[arg-type]
            )
        )
        with pytest.raises(FerryError) as caught:
            await client.request(command, timeout_s=30)
    assert caught.value.code is ErrorCode.INVALID_CREDENTIALS
    assert USERNAME not in str(caught.value) and PASSWORD not in str(caught.value)
