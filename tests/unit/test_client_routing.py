"""How the SDK routes what it reads: it takes only what is addressed to it (moto's SQS)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiobotocore.session import get_session
from botocore.exceptions import ClientError
from pydantic import SecretStr

from appliance.embedded import MotoServer
from clients.client import FerryClient
from clients.config import ClientSettings
from messages.codec import encode
from messages.commands import StatusRequest
from messages.events import CommandResponse, CommandResponseBody
from messages.keys import ApplianceKeyPair

TOKEN = "routing-token"
KEYS = ApplianceKeyPair.generate()  # the appliance that answers
OTHER = ApplianceKeyPair.generate()  # a key the answers do not verify against


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    server = MotoServer()
    asyncio.run(server.start())
    yield server
    asyncio.run(server.stop())


@pytest.fixture
async def sqs(moto: MotoServer) -> AsyncIterator[Any]:
    async with get_session().create_client(
        "sqs", endpoint_url=moto.url, region_name="us-east-1",
        aws_access_key_id="test", aws_secret_access_key="test",
    ) as client:  # fmt: skip
        yield client


@pytest.fixture
async def queues(sqs: Any, request: pytest.FixtureRequest) -> dict[str, str]:
    suffix = str(abs(hash(request.node.name)))[:10]
    return {
        name: (await sqs.create_queue(QueueName=f"{name}-{suffix}"))["QueueUrl"]
        for name in ("cmd", "rsp")
    }


def _settings(
    moto: MotoServer, queues: dict[str, str], pinned: ApplianceKeyPair = KEYS
) -> ClientSettings:
    return ClientSettings(
        sqs_endpoint=moto.url,
        command_queue=queues["cmd"],
        response_queue=queues["rsp"],
        bus_token=SecretStr(TOKEN),
        appliance_key=pinned.public.text,
        receive_wait_s=1,
    )


def _answer(correlation_id: str) -> str:
    body = CommandResponseBody(command_type="StatusRequest")
    return encode(CommandResponse(correlation_id=correlation_id, body=body), KEYS)


async def _counts(sqs: Any, url: str) -> tuple[int, int]:
    names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    attributes = (await sqs.get_queue_attributes(QueueUrl=url, AttributeNames=names))["Attributes"]
    return int(attributes[names[0]]), int(attributes[names[1]])


async def _until(sqs: Any, url: str, wanted: tuple[int, int]) -> None:
    async with asyncio.timeout(20):
        while True:
            if await _counts(sqs, url) == wanted:
                return
            await asyncio.sleep(0.05)


async def _seen_twice_by_the_client(sqs: Any, url: str) -> dict[str, Any]:
    """The one message on ``url``, once the client has received it twice (so it has routed
    it at least once) and it is still there. Our own reads hide nothing and are counted."""
    ours = 0
    async with asyncio.timeout(30):
        while True:
            response = await sqs.receive_message(
                QueueUrl=url,
                WaitTimeSeconds=1,
                VisibilityTimeout=0,
                MessageSystemAttributeNames=["ApproximateReceiveCount"],
            )
            for message in response.get("Messages", []):
                ours += 1
                if int(message["Attributes"]["ApproximateReceiveCount"]) - ours >= 2:
                    return dict(message)


@pytest.mark.parametrize("pinned", [KEYS, OTHER], ids=["verified", "unverifiable"])
async def test_the_shared_queue_keeps_what_is_not_ours(
    moto: MotoServer, sqs: Any, queues: dict[str, str], pinned: ApplianceKeyPair
) -> None:
    """Someone else's answer, or one this client cannot verify, is seen and left."""
    async with FerryClient(_settings(moto, queues, pinned), private_queue=False) as client:
        client.expect("my-own")  # waiting: the client reads the shared queue
        await sqs.send_message(QueueUrl=queues["rsp"], MessageBody=_answer("someone-else"))
        message = await _seen_twice_by_the_client(sqs, queues["rsp"])
    assert json.loads(message["Body"])["correlation_id"] == "someone-else"


async def test_an_answer_of_ours_is_delivered_and_deleted(
    moto: MotoServer, sqs: Any, queues: dict[str, str]
) -> None:
    async with FerryClient(_settings(moto, queues), private_queue=False) as client:
        client.expect("mine")
        await sqs.send_message(QueueUrl=queues["rsp"], MessageBody=_answer("mine"))
        answer = await client.next_answer("mine", timeout_s=20)
        assert answer.correlation_id == "mine"
        await _until(sqs, queues["rsp"], (0, 0))


async def test_a_private_reply_queue_is_named_in_commands_and_removed_on_exit(
    moto: MotoServer, sqs: Any, queues: dict[str, str]
) -> None:
    async with FerryClient(_settings(moto, queues)) as client:
        assert client.reply_queue is not None
        reply_url = (await sqs.get_queue_url(QueueName=client.reply_queue))["QueueUrl"]
        sent = await client.send(StatusRequest())
        explicit = await client.send(StatusRequest(reply_to="somewhere-else"))
        assert sent.reply_to == client.reply_queue
        assert explicit.reply_to == "somewhere-else"
        on_the_wire: list[str] = []
        while len(on_the_wire) < 2:
            response = await sqs.receive_message(
                QueueUrl=queues["cmd"], MaxNumberOfMessages=10, WaitTimeSeconds=5
            )
            on_the_wire += [json.loads(m["Body"])["reply_to"] for m in response["Messages"]]
        assert sorted(on_the_wire) == sorted([client.reply_queue, "somewhere-else"])
        # Whatever arrives on the private queue is this client's: delivered, then deleted.
        await sqs.send_message(QueueUrl=reply_url, MessageBody=_answer(sent.correlation_id))
        answer = await client.next_answer(sent.correlation_id, timeout_s=20)
        assert answer.correlation_id == sent.correlation_id
        await sqs.send_message(QueueUrl=reply_url, MessageBody=_answer("nobody-waits"))
        await _until(sqs, reply_url, (0, 0))
    with pytest.raises(ClientError):
        await sqs.get_queue_url(QueueName=client.reply_queue)
