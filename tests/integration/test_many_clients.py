"""Many clients, one appliance: nobody takes anybody else's answers."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiobotocore.session import get_session
from botocore.exceptions import ClientError
from pydantic import SecretStr

from clients.client import FerryClient
from clients.config import ClientSettings
from clients.monitor import HeartbeatMonitor, Outcome
from messages.commands import (
    SourceInventoryRequest,
    SourceInventoryRequestBody,
    StatusRequest,
)
from messages.common import MigrationState
from messages.events import Event, Heartbeat, StatusResponse
from tests.integration.conftest import Harness, RunningAppliance
from tests.integration.migration_helpers import clone_request, start_migration
from tests.support.lab import MIB, build_lab, lab_vm

StartAppliance = Callable[..., Awaitable[RunningAppliance]]
COMMANDS_EACH = 12


@contextlib.asynccontextmanager
async def _sqs(harness: Harness) -> AsyncIterator[Any]:
    async with get_session().create_client(
        "sqs", endpoint_url=harness.endpoint, region_name="us-east-1",
        aws_access_key_id="test", aws_secret_access_key="test",
    ) as sqs:  # fmt: skip
        yield sqs


async def _answers_to(client: FerryClient, count: int, within_s: float) -> dict[str, list[Event]]:
    """Send ``count`` inventory requests at once; collect every answer to each until each
    has one, then keep listening a little (a duplicate or a stray answer would show)."""
    commands = [
        SourceInventoryRequest(body=SourceInventoryRequestBody(page_size=5)) for _ in range(count)
    ]
    sent = await asyncio.gather(*(client.send(command) for command in commands))
    answers: dict[str, list[Event]] = {command.correlation_id: [] for command in sent}

    async def first(correlation_id: str) -> None:
        answers[correlation_id].append(await client.next_answer(correlation_id, within_s))

    await asyncio.gather(*(first(cid) for cid in answers))
    return answers


async def test_three_clients_a_monitor_and_a_stale_token_share_one_appliance(
    harness: Harness, start_appliance: StartAppliance
) -> None:
    await start_appliance(harness.settings(heartbeat_interval_s=0.5))
    settings = harness.client_settings()
    stale = ClientSettings(**{**settings.model_dump(), "bus_token": SecretStr("an-old-token")})
    async with (
        FerryClient(settings) as first,
        FerryClient(settings) as second,
        FerryClient(settings, private_queue=False) as shared,  # may not create queues
        FerryClient(stale, private_queue=False) as outdated,
        FerryClient(settings, private_queue=False) as watcher,
    ):
        assert first.reply_queue and second.reply_queue and first.reply_queue != second.reply_queue
        assert shared.reply_queue is None
        # The outdated client verifies nothing, and waits for an answer: it reads the shared
        # queue the whole time. It must not delete what it cannot read.
        outdated.expect("never-answered")
        monitor = HeartbeatMonitor(interval_s=5, count=10)
        watching = asyncio.create_task(monitor.watch(watcher.heartbeats(), lambda _beat: None))
        results = await asyncio.gather(
            _answers_to(first, COMMANDS_EACH, 60),
            _answers_to(second, COMMANDS_EACH, 60),
            _answers_to(shared, COMMANDS_EACH, 60),
        )
        watched = await asyncio.wait_for(watching, 60)
    for answers in results:
        assert len(answers) == COMMANDS_EACH
        for correlation_id, got in answers.items():
            assert [a.message_type for a in got] == ["SourceInventoryResponse"], correlation_id
            assert got[0].correlation_id == correlation_id
    assert watched.outcome is Outcome.COUNT_REACHED
    async with _sqs(harness) as sqs:
        for name in (first.reply_queue, second.reply_queue):
            with pytest.raises(ClientError):  # removed on exit
                await sqs.get_queue_url(QueueName=name)


async def test_an_unusable_reply_to_falls_back_to_the_shared_response_queue(
    harness: Harness, start_appliance: StartAppliance
) -> None:
    running = await start_appliance(harness.settings())
    settings = running.settings
    async with _sqs(harness) as sqs:
        commands_url = (await sqs.get_queue_url(QueueName=settings.command_queue))["QueueUrl"]
        foreign = commands_url.replace("000000000000", "123456789012")
        suffix = uuid.uuid4().hex[:8]
        elsewhere = (
            await sqs.create_queue(QueueName=f"{settings.response_queue}-elsewhere-{suffix}")
        )["QueueUrl"]
        other_app = (await sqs.create_queue(QueueName=f"other-app-{suffix}"))["QueueUrl"]
        refused = [
            f"{settings.response_queue}-no-such-queue-{suffix}",  # does not exist
            other_app,  # exists, but is no reply queue of this appliance's
            settings.command_queue,  # would feed answers back in as commands
            settings.dead_letter_queue,
            foreign,  # another account
        ]
        async with FerryClient(harness.client_settings(), private_queue=False) as client:
            for reply_to in refused:
                answer = await client.request(StatusRequest(reply_to=reply_to))
                assert isinstance(answer, StatusResponse), reply_to
            # A usable one: the answer lands there, not on the shared queue.
            command = await client.send(StatusRequest(reply_to=elsewhere))
            received = await sqs.receive_message(QueueUrl=elsewhere, WaitTimeSeconds=20)
            (message,) = received["Messages"]
            assert command.correlation_id in message["Body"]
            assert client._waiters[command.correlation_id].empty()
        await sqs.delete_queue(QueueUrl=elsewhere)
        other_app_counts = await sqs.get_queue_attributes(
            QueueUrl=other_app, AttributeNames=["ApproximateNumberOfMessages"]
        )
        assert other_app_counts["Attributes"]["ApproximateNumberOfMessages"] == "0"
        await sqs.delete_queue(QueueUrl=other_app)
        # No answer went to the dead-letter queue, nor into the command queue (where the
        # appliance would have rejected it, and dead-lettered it).
        dlq = (await sqs.get_queue_url(QueueName=settings.dead_letter_queue))["QueueUrl"]
        names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
        attributes = await sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=names)
        assert set(attributes["Attributes"].values()) == {"0"}


async def test_a_migrations_progress_goes_to_the_reply_queue_of_the_command_that_started_it(
    harness: Harness, start_appliance: StartAppliance
) -> None:
    vm = lab_vm(1, disks=1, disk_size=8 * MIB)
    await build_lab(harness.data_dir, [vm])
    await start_appliance(harness.settings())
    async with (
        FerryClient(harness.client_settings()) as owner,
        FerryClient(harness.client_settings(), private_queue=False) as bystander,
    ):
        request = clone_request(owner, [vm.vm_id])
        bystander.expect(request.correlation_id)  # would catch anything on the shared queue
        follower = await start_migration(owner, request)
        (status,) = (await follower.finished(1)).values()
        assert status.state is MigrationState.COMPLETED, status.error
        assert len(follower.history) >= 3
        # Nothing of it went to the shared queue: the bystander, reading it, got none.
        probe = await bystander.request(StatusRequest())
        assert isinstance(probe, StatusResponse)
        assert bystander._waiters[request.correlation_id].empty()


async def test_two_watchers_each_follow_the_whole_heartbeat_stream(
    harness: Harness, start_appliance: StartAppliance
) -> None:
    await start_appliance(harness.settings(heartbeat_interval_s=1.0))
    settings = harness.client_settings()
    seen: dict[str, set[int]] = {"one": set(), "two": set()}

    async def recorded(name: str, beats: AsyncIterator[Heartbeat]) -> AsyncIterator[Heartbeat]:
        async for beat in beats:
            seen[name].add(beat.body.sequence)
            yield beat

    async with (
        FerryClient(settings, private_queue=False) as one,
        FerryClient(settings, private_queue=False) as two,
    ):
        results = await asyncio.wait_for(
            asyncio.gather(
                HeartbeatMonitor(interval_s=10, count=8).watch(
                    recorded("one", one.heartbeats()), lambda _beat: None
                ),
                HeartbeatMonitor(interval_s=10, count=8).watch(
                    recorded("two", two.heartbeats()), lambda _beat: None
                ),
            ),
            60,
        )
    assert [r.outcome for r in results] == [Outcome.COUNT_REACHED] * 2
    # Each got the heartbeats, not half of them each: a watcher does not take them away.
    assert len(seen["one"] & seen["two"]) >= 6, seen


async def test_answers_for_a_reply_queue_deleted_since_go_to_the_shared_queue(
    harness: Harness, start_appliance: StartAppliance
) -> None:
    running = await start_appliance(harness.settings())
    name = f"{running.settings.response_queue}-reply-gone"
    async with _sqs(harness) as sqs:
        url = (await sqs.create_queue(QueueName=name))["QueueUrl"]
        async with FerryClient(harness.client_settings(), private_queue=False) as client:
            first = await client.send(StatusRequest(reply_to=name))
            received = await sqs.receive_message(QueueUrl=url, WaitTimeSeconds=20)
            assert first.correlation_id in received["Messages"][0]["Body"]
            await sqs.delete_queue(QueueUrl=url)  # its client went away
            # The appliance knows the queue's URL from before; the send now fails, and the
            # answer goes to the shared queue instead of being lost.
            answer = await client.request(StatusRequest(reply_to=name))
            assert isinstance(answer, StatusResponse)
