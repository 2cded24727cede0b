"""Messages at SQS's own size limit: answered once, dead-lettered once, deleted once."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiobotocore.session import get_session

from clients.client import FerryClient
from tests.integration.conftest import Harness, RunningAppliance

StartAppliance = Callable[..., Awaitable[RunningAppliance]]
SQS_LIMIT = 1024 * 1024


def _body_of_exactly(size: int, correlation_id: str) -> str:
    document = {"message_type": "SourceInventoryRequest", "correlation_id": correlation_id}
    base = len(json.dumps({**document, "padding": ""}, separators=(",", ":")))
    body = json.dumps({**document, "padding": "x" * (size - base)}, separators=(",", ":"))
    assert len(body.encode()) == size
    return body


# aiohttp warns about any request body over 1 MiB (the client's send is one).
@pytest.mark.filterwarnings("ignore:Sending a large body:ResourceWarning")
async def test_a_body_of_exactly_one_mib_is_dead_lettered_and_deleted_once(
    harness: Harness, start_appliance: StartAppliance
) -> None:
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    settings = harness.settings(visibility_timeout_s=5)
    await start_appliance(settings)
    correlation_id = "one-mib"
    body = _body_of_exactly(SQS_LIMIT, correlation_id)
    async with (
        FerryClient(harness.client_settings()) as client,
        get_session().create_client(
            "sqs",
            endpoint_url=harness.endpoint,
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        ) as sqs,  # fmt: skip
    ):
        client.expect(correlation_id)
        await client.send_raw(body)
        dlq = (await sqs.get_queue_url(QueueName=settings.dead_letter_queue))["QueueUrl"]
        commands = (await sqs.get_queue_url(QueueName=settings.command_queue))["QueueUrl"]
        dead = await _receive_all(sqs, dlq, expect=1, within_s=30)
        await _until_empty(sqs, commands, within_s=30)
        # Past two visibility timeouts: a message that was not deleted would be back by now.
        answers = await _answers(client, correlation_id, 2 * settings.visibility_timeout_s + 2)
        assert len(dead) == 1
    # Too large to be authenticated: never answered (a forger could otherwise fail another
    # client's pending request), and settled once: one dead letter, deleted, no redelivery.
    assert answers == []
    attributes = {k: v["StringValue"] for k, v in dead[0].get("MessageAttributes", {}).items()}
    assert attributes["ferry_original_bytes"] == str(SQS_LIMIT)
    assert len(dead[0]["Body"].encode()) < SQS_LIMIT
    assert body.startswith(dead[0]["Body"])
    assert attributes["ferry_original_sha256"] == hashlib.sha256(body.encode()).hexdigest()
    gc.collect()
    assert not seen, seen


async def _receive_all(sqs: Any, url: str, expect: int, within_s: float) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    deadline = time.monotonic() + within_s
    while len(messages) < expect and time.monotonic() < deadline:
        response = await sqs.receive_message(
            QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1, MessageAttributeNames=["All"]
        )
        for message in response.get("Messages", []):
            messages.append(message)
            await sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    return messages


async def _until_empty(sqs: Any, url: str, within_s: float) -> None:
    """Until the queue holds nothing, visible or in flight (i.e. the message was deleted)."""
    names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    deadline = time.monotonic() + within_s
    while True:
        attributes = (await sqs.get_queue_attributes(QueueUrl=url, AttributeNames=names))[
            "Attributes"
        ]
        if all(attributes[name] == "0" for name in names):
            return
        assert time.monotonic() < deadline, f"command queue not empty: {attributes}"
        await asyncio.sleep(0.2)


async def _answers(client: FerryClient, correlation_id: str, for_s: float) -> list[Any]:
    """Every answer for ``correlation_id`` that arrives within ``for_s`` seconds."""
    answers: list[Any] = []
    queue = client._waiters[correlation_id]
    deadline = time.monotonic() + for_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            answers.append(await asyncio.wait_for(queue.get(), timeout=left))
        except TimeoutError:
            break
    return answers
