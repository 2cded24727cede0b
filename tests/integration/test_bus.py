"""The control plane on LocalStack + a real redis-server, end to end through SQS."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from aiobotocore.session import get_session

from appliance.embedded import RedisServer
from appliance.sites.lab.create import create_lab
from appliance.sites.lab.sample import SampleSpec
from appliance.state.events import EventLog
from appliance.state.keys import Keys
from appliance.state.store import StateStore, connect
from clients.client import FerryClient, FerryError
from messages.codec import encode, signature_of
from messages.commands import (
    InventoryFilter,
    SourceInventoryRequest,
    SourceInventoryRequestBody,
    StatusRequest,
)
from messages.envelope import utcnow
from messages.errors import ErrorCode
from messages.events import ErrorResponse, Event, ReadyStatus, SourceInventoryResponse
from tests.integration.conftest import TOKEN, Harness, RunningAppliance

StartAppliance = Callable[..., Awaitable[RunningAppliance]]


async def _collect(
    client: FerryClient, correlation_ids: list[str], within_s: float, settle_s: float = 2.0
) -> dict[str, list[Event]]:
    """Answers for these correlation ids: until each has one (or time is up), then a
    little longer so that a duplicate answer would be caught too."""
    answers: dict[str, list[Event]] = {cid: [] for cid in correlation_ids}
    for cid in correlation_ids:
        client.expect(cid)

    def drain() -> None:
        for cid in correlation_ids:
            queue = client._waiters[cid]
            while not queue.empty():
                answers[cid].append(queue.get_nowait())

    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline and not all(answers.values()):
        drain()
        await asyncio.sleep(0.1)
    await asyncio.sleep(settle_s)
    drain()
    return answers


async def test_inventory_round_trip_with_paging(
    harness: Harness, start_appliance: StartAppliance
) -> None:
    await create_lab(harness.data_dir, SampleSpec(vms=25, seed=11), fill=False)
    await start_appliance(harness.settings())
    async with FerryClient(harness.client_settings()) as client:
        vms = await client.inventory(page_size=10)
        assert len(vms) == 25
        assert [vm.name for vm in vms] == sorted(vm.name for vm in vms)
        first = await client.request(
            SourceInventoryRequest(body=SourceInventoryRequestBody(page_size=10))
        )
        assert isinstance(first, SourceInventoryResponse)
        assert len(first.body.vms) == 10 and first.body.total_count == 25
        assert first.body.next_page_token is not None
        windows = await client.inventory(InventoryFilter(name_glob="win-*"), page_size=2)
        assert windows and all(vm.name.startswith("win-") for vm in windows)


async def test_the_same_command_delivered_five_times_has_one_effect(
    harness: Harness, start_appliance: StartAppliance
) -> None:
    await start_appliance(harness.settings())
    command = SourceInventoryRequest()
    body = encode(command, TOKEN)
    async with FerryClient(harness.client_settings()) as client:
        client.expect(command.correlation_id)
        for _ in range(5):
            await client.send_raw(body)
        answers = await _collect(client, [command.correlation_id], within_s=6)
    assert [a.message_type for a in answers[command.correlation_id]] == ["SourceInventoryResponse"]
    store = StateStore(connect(harness.redis_url), Keys(harness.prefix))
    try:
        events = await EventLog(store).read(count=1000)
    finally:
        await store.close()
    assert [e.fields["message_id"] for e in events if e.kind == "command"] == [command.message_id]


def _bad_bodies(count: int) -> list[tuple[str, str | None, ErrorCode | None]]:
    """(body, correlation id if readable, expected code or None for "never answered") for a
    mix of bad input. Only what is signed with the bus token gets an answer."""
    bodies: list[tuple[str, str | None, ErrorCode | None]] = []
    for n in range(count):
        cid = f"bad-{n}-{uuid.uuid4().hex[:6]}"
        kind = n % 10
        good = json.loads(encode(SourceInventoryRequest(correlation_id=cid), TOKEN))
        if kind == 0:
            bodies.append((f"garbage {n} {{", None, None))
        elif kind == 1:
            bodies.append((json.dumps({"message_type": "Nope", "correlation_id": cid}), cid, None))
        elif kind == 2:
            del good["signature"]
            bodies.append((json.dumps(good), cid, None))
        elif kind == 3:
            good["body"]["page_size"] = 5
            bodies.append((json.dumps(good), cid, None))  # tampered: bad signature
        elif kind == 4:
            stale = SourceInventoryRequest(
                correlation_id=cid, sent_at=utcnow() - timedelta(hours=1)
            )
            bodies.append((encode(stale, TOKEN), cid, ErrorCode.STALE_MESSAGE))
        elif kind == 5:
            good["body"]["page_size"] = -1
            good["signature"] = signature_of(good, TOKEN)
            bodies.append((json.dumps(good), cid, ErrorCode.SCHEMA_VIOLATION))
        elif kind == 6:
            good["padding"] = "x" * 20_000
            bodies.append((json.dumps(good), cid, None))  # too large
        elif kind == 7:
            good["message_type"] = "Nope"
            good["signature"] = signature_of(good, TOKEN)
            bodies.append((json.dumps(good), cid, ErrorCode.UNKNOWN_MESSAGE_TYPE))
        elif kind == 8:
            deep = '{"correlation_id": "' + cid + '", "body": ' + "[" * 980 + "]" * 980 + "}"
            bodies.append((deep, cid, None))
        else:
            bodies.append(("[]", None, None))
    return bodies


async def test_two_hundred_malformed_bodies_are_dead_lettered_answered_only_if_signed(
    harness: Harness, start_appliance: StartAppliance
) -> None:
    running = await start_appliance(harness.settings(max_message_bytes=16 * 1024, max_in_flight=32))
    bodies = _bad_bodies(200)
    async with FerryClient(harness.client_settings()) as client:
        silent = [cid for _, cid, code in bodies if cid is not None and code is None]
        for cid in silent:
            client.expect(cid)
        await asyncio.gather(*(client.send_raw(body) for body, _, _ in bodies))
        expected = {cid: code for _, cid, code in bodies if cid is not None and code is not None}
        answers = await _collect(client, list(expected), within_s=20)
        for cid, code in expected.items():
            got = answers[cid]
            assert len(got) == 1, f"{cid}: {len(got)} answers"
            assert isinstance(got[0], ErrorResponse)
            assert got[0].body.code is code
        dead = await _drain_queue(harness, running.settings.dead_letter_queue, expect=200)
        assert sorted(dead) == sorted(body for body, _, _ in bodies)
        # Still serving; and by the time this round trip is done, nothing answered the rest.
        vms = await client.inventory()
        assert vms == []
        assert all(client._waiters[cid].empty() for cid in silent)


async def _drain_queue(
    harness: Harness, queue: str, expect: int, within_s: float = 20
) -> list[str]:
    bodies: list[str] = []
    async with get_session().create_client(
        "sqs", endpoint_url=harness.endpoint, region_name="us-east-1",
        aws_access_key_id="test", aws_secret_access_key="test",
    ) as sqs:  # fmt: skip
        url = (await sqs.get_queue_url(QueueName=queue))["QueueUrl"]
        deadline = time.monotonic() + within_s
        while len(bodies) < expect and time.monotonic() < deadline:
            response = await sqs.receive_message(
                QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1
            )
            for message in response.get("Messages", []):
                bodies.append(message["Body"])
                await sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    return bodies


async def test_heartbeat_goes_not_ready_while_redis_is_down_and_nothing_is_lost(
    harness: Harness, start_appliance: StartAppliance, tmp_path: Path
) -> None:
    redis = RedisServer(tmp_path / "own-redis")
    await redis.start()
    try:
        await start_appliance(harness.settings(redis_url=redis.url))
        async with FerryClient(harness.client_settings()) as client:
            beats = client.heartbeats()
            assert await _beat_until(beats, ReadyStatus.READY)
            await redis.stop()
            down = await _beat_until(beats, ReadyStatus.NOT_READY)
            assert any(d.startswith("state_store") for d in down.body.status_details)
            command = StatusRequest()
            await client.send(command)  # sent while the state store is down
            await redis.start()
            up = await _beat_until(beats, ReadyStatus.READY)
            assert up.body.status_details == ()
            answer = await client.next_answer(command.correlation_id, timeout_s=30)
            assert answer.message_type == "StatusResponse"
    finally:
        await redis.stop()


async def _beat_until(beats: Any, status: ReadyStatus, within_s: float = 30) -> Any:
    async with asyncio.timeout(within_s):
        async for beat in beats:
            if beat.body.status is status:
                return beat
    raise AssertionError("heartbeat stream ended")


def _spawn(harness: Harness, log: Path, **overrides: object) -> subprocess.Popen[bytes]:
    env = {**os.environ, **harness.env(**overrides)}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "appliance.cli", "run"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def test_sigterm_with_commands_in_flight_loses_none(harness: Harness, tmp_path: Path) -> None:
    await create_lab(harness.data_dir, SampleSpec(vms=200, seed=5), fill=False)
    log = tmp_path / "appliance.log"
    first = _spawn(harness, log, max_in_flight=4, drain_timeout_s=0.5)
    commands = [
        SourceInventoryRequest(body=SourceInventoryRequestBody(page_size=200)) for _ in range(60)
    ]
    try:
        await _wait_for(lambda: (harness.data_dir / "runtime.json").exists(), 60)
        async with FerryClient(harness.client_settings()) as client:
            for command in commands:
                client.expect(command.correlation_id)
            await asyncio.gather(*(client.send(c) for c in commands))
            await _wait_for(
                lambda: any(not client._waiters[c.correlation_id].empty() for c in commands), 30
            )
            first.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(first.wait, 60) == 0, log.read_text()[-3000:]
            second = _spawn(harness, log)
            try:
                answers = await _collect(client, [c.correlation_id for c in commands], within_s=25)
            finally:
                second.send_signal(signal.SIGTERM)
                await asyncio.to_thread(second.wait, 60)
    finally:
        if first.poll() is None:
            first.kill()
    counts = {cid: len(a) for cid, a in answers.items()}
    assert all(n == 1 for n in counts.values()), counts
    assert "draining" in log.read_text(), "SIGTERM should have found commands in flight"


async def _wait_for(predicate: Callable[[], bool], within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.1)


async def test_a_redis_that_comes_back_empty_is_noticed_and_reset_recovers(
    harness: Harness, start_appliance: StartAppliance, tmp_path: Path
) -> None:
    import shutil

    from messages.commands import (
        CloneVm,
        ResetRequest,
        ResetRequestBody,
        SourceCloneRequest,
        SourceCloneRequestBody,
    )
    from messages.common import MigrationType

    redis_dir = tmp_path / "own-redis"
    redis = RedisServer(redis_dir)
    await redis.start()
    try:
        await start_appliance(harness.settings(redis_url=redis.url))
        async with FerryClient(harness.client_settings()) as client:
            beats = client.heartbeats()
            assert await _beat_until(beats, ReadyStatus.READY)
            redis.kill()
            shutil.rmtree(redis_dir)  # it comes back with nothing: a lost or replaced Redis
            await redis.start()
            lost = await _beat_until(beats, ReadyStatus.NOT_READY)
            while not any(d.startswith("state_generation") for d in lost.body.status_details):
                lost = await _beat_until(beats, ReadyStatus.NOT_READY)
            clone = SourceCloneRequest(
                body=SourceCloneRequestBody(
                    vms=(CloneVm(name="anything"),), migration_type=MigrationType.COLD
                )
            )
            try:
                await client.request(clone)
            except FerryError as error:
                assert error.code is ErrorCode.UNAVAILABLE
                assert "ResetRequest" in str(error)
            else:  # pragma: no cover
                raise AssertionError("migrations must be refused while state is lost")
            await client.request(ResetRequest(body=ResetRequestBody(confirm=True)))
            assert await _beat_until(beats, ReadyStatus.READY)
    finally:
        await redis.stop()
