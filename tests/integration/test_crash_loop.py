"""A crash loop does not eat commands: every valid command is answered, none dead-lettered.

The appliance runs as a child process and is SIGKILLed again and again while a
client keeps sending inventory requests: sometimes right after one of them was
answered (so others are being handled), sometimes at a random point (a seeded
RNG), and each time the next commands are sent at once, while the dead
process's long poll may still be in flight and take them.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiobotocore.session import get_session

from appliance.sites.lab.create import create_lab
from appliance.sites.lab.sample import SampleSpec
from clients.client import FerryClient
from messages.commands import SourceInventoryRequest, SourceInventoryRequestBody
from messages.events import Event
from tests.integration.conftest import Harness
from tests.integration.migration_helpers import ApplianceProcess

KILLS = 6
SEED = 20261201
# The production visibility timeout and redrive bound; a short visibility on receive;
# a long poll that outlives its process.
OVERRIDES: dict[str, object] = {
    "visibility_timeout_s": 60,
    "initial_visibility_s": 3,
    "receive_wait_s": 5,
}


class Answers:
    """Every answer for the correlation ids sent, as they arrive."""

    def __init__(self, client: FerryClient) -> None:
        self._client = client
        self.got: dict[str, list[Event]] = {}
        self._arrived = asyncio.Event()
        self._readers: list[asyncio.Task[None]] = []

    async def send(self, count: int) -> list[str]:
        commands = [
            SourceInventoryRequest(body=SourceInventoryRequestBody(page_size=2))
            for _ in range(count)
        ]
        for command in commands:
            self.got[command.correlation_id] = []
            self._readers.append(asyncio.create_task(self._read(command.correlation_id)))
        await asyncio.gather(*(self._client.send(command) for command in commands))
        return [command.correlation_id for command in commands]

    async def _read(self, correlation_id: str) -> None:
        async for event in self._client.answers(correlation_id):
            self.got[correlation_id].append(event)
            self._arrived.set()

    async def until(self, done: Any, within_s: float) -> None:
        async with asyncio.timeout(within_s):
            while True:
                self._arrived.clear()
                if done():
                    return
                await self._arrived.wait()

    async def close(self) -> None:
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)


@contextlib.asynccontextmanager
async def _sqs(harness: Harness) -> AsyncIterator[Any]:
    async with get_session().create_client(
        "sqs", endpoint_url=harness.endpoint, region_name="us-east-1",
        aws_access_key_id="test", aws_secret_access_key="test",
    ) as sqs:  # fmt: skip
        yield sqs


async def _queue_counts(harness: Harness, queue: str) -> dict[str, str]:
    names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    async with _sqs(harness) as sqs:
        url = (await sqs.get_queue_url(QueueName=queue))["QueueUrl"]
        response = await sqs.get_queue_attributes(QueueUrl=url, AttributeNames=names)
    return dict(response["Attributes"])


@pytest.mark.timeout(300)
async def test_sigkill_in_a_loop_while_commands_arrive_answers_every_command(
    harness: Harness, tmp_path: Path
) -> None:
    await create_lab(harness.data_dir, SampleSpec(vms=6, seed=3), fill=False)
    rng = random.Random(SEED)
    log = tmp_path / "appliance.log"
    kinds: list[str] = []
    appliance = await ApplianceProcess(harness, log, **OVERRIDES).start()
    try:
        async with FerryClient(harness.client_settings()) as client:
            answers = Answers(client)
            try:
                for _ in range(KILLS):
                    batch = await answers.send(4)
                    if rng.random() < 0.5:
                        kinds.append("after an answer")
                        await answers.until(lambda b=batch: any(answers.got[c] for c in b), 60)
                    else:
                        kinds.append("at random")
                        await asyncio.sleep(rng.uniform(0.0, 1.5))
                    appliance.kill()
                    # Sent while the dead process's long poll may still be waiting for messages.
                    await answers.send(2)
                    appliance = await ApplianceProcess(harness, log, **OVERRIDES).start()
                started = time.monotonic()
                await answers.until(lambda: all(answers.got.values()), 120)
                recovered_s = time.monotonic() - started
            finally:
                await answers.close()
    finally:
        appliance.kill()
    assert len(answers.got) == KILLS * 6
    for correlation_id, got in answers.got.items():
        assert got, f"{correlation_id} was never answered"
        assert {a.message_type for a in got} == {"SourceInventoryResponse"}, got
    assert await _queue_counts(harness, harness.settings().dead_letter_queue) == {
        "ApproximateNumberOfMessages": "0",
        "ApproximateNumberOfMessagesNotVisible": "0",
    }
    # Receives lost to a kill come back after the short initial visibility, and commands a
    # killed handler had claimed are taken over as soon: not after the 60 s timeout.
    assert recovered_s < 30, (recovered_s, kinds)
