"""Detection and health: a component killed (SIGKILL) is named in a Not Ready heartbeat, new
migrations that need it are refused (services_degraded) while cold ones go on, and once it
is back the heartbeat is Ready again; the event log says when it failed and recovered.

The components are real processes (``python -m appliance.cli component ...`` with the echo
runtime) started by the test, as on their own hosts (``remote_components``): the test
decides when one comes back. The heartbeat travels over SQS (LocalStack), the state and
the event log live in the real Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from appliance.components.orders import ComponentId
from appliance.embedded import RedisServer
from appliance.service.components import component_command
from appliance.service.health import HealthEvent
from appliance.state.events import EventRecord, _record
from appliance.state.keys import Keys
from appliance.state.store import StateStore, connect
from clients.client import FerryClient, FerryError
from messages.commands import EventsRequestBody
from messages.common import MigrationState
from messages.errors import ErrorCode
from messages.events import ComponentState, Heartbeat, ReadyStatus
from tests.integration.conftest import Harness, RunningAppliance
from tests.integration.migration_helpers import clone_request, start_migration
from tests.integration.tbc_helpers import tbc_request
from tests.integration.test_cli_commands import ferry
from tests.support.lab import MIB, build_lab, lab_vm

ROOT = Path(__file__).resolve().parents[2]
ONPREM = ComponentId("onprem", "onprem-1")
CACHE = ComponentId("cache", "cache-1")
TIMEOUT_S = 5.0  # silent this long = failed: seconds, with room for a loaded machine
WAIT_S = 90.0
StartAppliance = Callable[..., Awaitable[RunningAppliance]]


class Components:
    """The two components as processes of this test: started, killed, started again."""

    def __init__(self, harness: Harness, tmp_path: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
        self._env = env | {
            "PYTHONPATH": str(ROOT),
            "FERRY_REDIS_URL": harness.redis_url,
            "FERRY_REDIS_PREFIX": harness.prefix,
            "FERRY_DATA_DIR": str(tmp_path / "components"),
            "FERRY_TEST_MODE": "1",
            "FERRY_COMPONENT_HEARTBEAT_INTERVAL_S": "0.2",
            "FERRY_COMPONENT_TIMEOUT_S": str(TIMEOUT_S),
            "FERRY_LOG_LEVEL": "info",
        }
        self._tmp = tmp_path
        self.processes: dict[ComponentId, asyncio.subprocess.Process] = {}

    async def start(self, instance: ComponentId) -> None:
        command = component_command(
            instance,
            data_dir=self._tmp / "components" / instance.kind / instance.name,
            nbd_bind="127.0.0.1:0",
            env=self._env,
            log_file=self._tmp / f"{instance.kind}-{instance.name}.log",
            extra=("--runtime", "tests.support.echo:EchoRuntime"),
            cwd=ROOT,
        )
        command.log_file.parent.mkdir(parents=True, exist_ok=True)
        with command.log_file.open("ab") as output:
            self.processes[instance] = await asyncio.create_subprocess_exec(
                *command.argv, stdin=asyncio.subprocess.DEVNULL, stdout=output,
                stderr=output, env=dict(command.env), cwd=command.cwd,
            )  # fmt: skip

    async def kill(self, instance: ComponentId) -> None:
        process = self.processes.pop(instance)
        process.send_signal(signal.SIGKILL)
        await process.wait()

    async def close(self) -> None:
        for instance in list(self.processes):
            with contextlib.suppress(ProcessLookupError):
                await self.kill(instance)


@pytest.fixture
async def components(harness: Harness, tmp_path: Path) -> AsyncIterator[Components]:
    running = Components(harness, tmp_path)
    try:
        yield running
    finally:
        await running.close()


async def beat_until(
    client: FerryClient, wanted: Callable[[Heartbeat], bool], within_s: float = WAIT_S
) -> Heartbeat:
    async with asyncio.timeout(within_s):
        async for beat in client.heartbeats():
            if wanted(beat):
                return beat
    raise AssertionError("heartbeats ended")  # pragma: no cover


def states(beat: Heartbeat) -> dict[str, ComponentState]:
    return {c.name: c.state for c in beat.body.components}


async def health_events_until(
    store: StateStore, wanted: Callable[[list[EventRecord]], bool], within_s: float = WAIT_S
) -> list[EventRecord]:
    """The detection events of the global stream, once ``wanted`` accepts them (blocking reads
    of the stream, no sleeps)."""
    kinds = {kind.value for kind in HealthEvent}
    seen: list[EventRecord] = []
    after = "0"
    async with asyncio.timeout(within_s):
        while not wanted(seen):
            rows: Any = await store.redis.xread({store.keys.events: after}, block=1000)
            for _, entries in rows or []:
                for event_id, fields in entries:
                    record = _record(event_id, fields)
                    after = record.event_id
                    if record.kind in kinds:
                        seen.append(record)
    return seen


def failed_then_recovered(name: str) -> Callable[[list[EventRecord]], bool]:
    def done(events: list[EventRecord]) -> bool:
        mine = [e.kind for e in events if e.fields.get("component") == name]
        return mine[-2:] == [HealthEvent.COMPONENT_FAILED, HealthEvent.COMPONENT_RECOVERED]

    return done


async def test_a_killed_cache_turns_the_appliance_not_ready_and_refuses_new_tbc_migrations(
    harness: Harness, start_appliance: StartAppliance, components: Components
) -> None:
    vm = lab_vm(1, disks=1, disk_size=4 * MIB)
    await build_lab(harness.data_dir, [vm])
    for instance in (ONPREM, CACHE):
        await components.start(instance)
    settings = harness.settings(
        remote_components=f"{ONPREM},{CACHE}", component_timeout_s=TIMEOUT_S
    )
    await start_appliance(settings)
    store = StateStore(connect(harness.redis_url), Keys(harness.prefix))
    async with FerryClient(harness.client_settings()) as client:
        both_ok = await beat_until(client, lambda b: b.body.status is ReadyStatus.READY)
        assert states(both_ok)[str(CACHE)] is ComponentState.OK
        assert states(both_ok)[str(ONPREM)] is ComponentState.OK
        assert both_ok.body.status_details == ()

        killed_at = time.monotonic()
        await components.kill(CACHE)
        down = await beat_until(client, lambda b: b.body.status is ReadyStatus.NOT_READY)
        detected_s = time.monotonic() - killed_at
        assert detected_s >= TIMEOUT_S - 0.5  # not before its heartbeat's timeout
        assert down.body.status_details[0] == "Services not ready or down cache/cache-1"
        assert states(down)[str(CACHE)] is ComponentState.FAILED
        assert states(down)[str(ONPREM)] is ComponentState.OK
        assert states(down)["state_store"] is ComponentState.OK

        with pytest.raises(FerryError) as refused:
            await client.request(tbc_request(client, [vm.vm_id]), timeout_s=60)
        assert refused.value.code is ErrorCode.SERVICES_DEGRADED
        message = refused.value.response.body.message
        assert "Services not ready or down cache/cache-1" in message
        assert "new operations disallowed" in message

        # ferry health: the components and their states; exit 4 while Not Ready.
        code, out = await ferry(harness, "health")
        assert code == 4, out
        assert "Services not ready or down cache/cache-1" in out
        rows = {line.split()[1]: line for line in out.splitlines() if "/" in line[:20]}
        assert "failed" in rows["cache/cache-1"] and "no heartbeat" in rows["cache/cache-1"]
        assert " ok " in rows["onprem/onprem-1"]

        # A cold migration does not need the cache: taken and finished while it is down.
        follower = await start_migration(client, clone_request(client, [vm.vm_id]))
        (status,) = (await follower.finished(1)).values()
        assert status.state is MigrationState.COMPLETED, status.error
        still_down = await beat_until(client, lambda b: True)
        assert still_down.body.status is ReadyStatus.NOT_READY  # it did not come back alone

        restarted_at = time.monotonic()
        await components.start(CACHE)
        back = await beat_until(client, lambda b: b.body.status is ReadyStatus.READY)
        print(f"detection {detected_s:.2f}s (timeout {TIMEOUT_S}s), ready again "
              f"{time.monotonic() - restarted_at:.2f}s after the restart")  # fmt: skip
        assert states(back)[str(CACHE)] is ComponentState.OK and back.body.status_details == ()
        code, out = await ferry(harness, "health")
        assert code == 0 and "Not Ready" not in out, out

        await health_events_until(store, failed_then_recovered(str(CACHE)))
        answer = await client.events(
            EventsRequestBody(kinds=("component_failed", "component_recovered"))
        )
        wire = [(e.kind, e.fields["component"]) for e in answer.body.events]
        assert wire == [("component_failed", str(CACHE)), ("component_recovered", str(CACHE))]
        code, out = await ferry(harness, "events", "--kind", "component_failed")
        assert code == 0 and "component_failed" in out and "cache/cache-1" in out, out
        assert "component_recovered" not in out

    try:
        events = await health_events_until(store, failed_then_recovered(str(CACHE)))
    finally:
        await store.close()
    cache_events = [e for e in events if e.fields.get("component") == str(CACHE)]
    assert [e.kind for e in cache_events] == ["component_failed", "component_recovered"]
    assert "no heartbeat" in cache_events[0].fields["detail"]
    assert not [e for e in events if e.fields.get("component") == str(ONPREM)]


async def test_ferry_health_answers_from_the_heartbeat_while_the_state_store_is_down(
    harness: Harness, start_appliance: StartAppliance, tmp_path: Path
) -> None:
    """Redis stopped: the heartbeat names it, ``ferry health`` still answers (a StatusRequest
    waits on the queue, the heartbeat does not); back: Ready, and the failure and recovery
    noticed while it was down are in the event log."""
    redis = RedisServer(tmp_path / "own-redis")
    await redis.start()
    try:
        await start_appliance(harness.settings(redis_url=redis.url))
        async with FerryClient(harness.client_settings()) as client:
            await beat_until(client, lambda b: b.body.status is ReadyStatus.READY)
            await redis.stop()
            down = await beat_until(client, lambda b: b.body.status is ReadyStatus.NOT_READY)
            assert down.body.status_details[0] == "Services not ready or down state_store"
            code, out = await ferry(harness, "health")
            assert code == 4 and "Services not ready or down state_store" in out, out
            await redis.start()
            await beat_until(client, lambda b: b.body.status is ReadyStatus.READY)
        store = StateStore(connect(redis.url), Keys(harness.prefix))
        try:
            events = await health_events_until(store, failed_then_recovered("state_store"))
        finally:
            await store.close()
        assert [e.kind for e in events if e.fields["component"] == "state_store"] == [
            "component_failed",
            "component_recovered",
        ]
    finally:
        await redis.stop()
