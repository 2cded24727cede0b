"""Repair with real component processes (the echo runtime), the appliance over LocalStack and
the real Redis: an embedded component that hangs (SIGSTOP) past its timeout is killed and
restarted by its supervisor; a remote one is restarted by the repair command (a script that
starts the process); a repair command that keeps failing is retried with a growing backoff
and given up at the repair deadline, and the board says the component is unrepairable.
The event log shows each step; the metrics count failures and repairs."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from appliance.components.heartbeat import ComponentHealth, ComponentReport, Liveness
from appliance.components.orders import ComponentId
from appliance.health import ComponentHealth as ComponentHealth_
from appliance.logs import MASK
from appliance.service.components import ComponentCommand, component_command
from appliance.service.health import HealthEvent
from appliance.service.runtime import RUNTIME_FILE
from appliance.state.events import EventRecord
from appliance.state.keys import Keys
from appliance.state.store import StateStore, connect
from clients.client import FerryClient
from messages.events import ComponentState, ReadyStatus
from tests.integration.conftest import TOKEN, Harness, RunningAppliance
from tests.integration.migration_helpers import ApplianceProcess
from tests.integration.tbc_helpers import kill_pids
from tests.integration.test_health import beat_until, health_events_until, states
from tests.support.scrape import scrape

ROOT = Path(__file__).resolve().parents[2]
CACHE = ComponentId("cache", "cache-1")
TIMEOUT_S = 6.0  # silent this long: failed (room for a loaded machine)
WAIT_S = 90.0
ECHO = "tests.support.echo:EchoRuntime"
START_SCRIPT = ROOT / "tests" / "support" / "start_component.py"
RESTART_BACKOFF_S = 300.0  # an exit alone would wait this long before its restart
StartAppliance = Callable[..., Awaitable[RunningAppliance]]
pytestmark = pytest.mark.timeout(240)


def kinds_of(events: list[EventRecord], name: str) -> list[str]:
    return [e.kind for e in events if e.fields.get("component") == name]


def repaired(name: str) -> Callable[[list[EventRecord]], bool]:
    return lambda events: HealthEvent.COMPONENT_REPAIRED in kinds_of(events, name)


async def events_since(
    store: StateStore, at: datetime, wanted: Callable[[list[EventRecord]], bool]
) -> list[EventRecord]:
    """The detection and repair events from ``at`` on (what the test caused), once
    ``wanted`` accepts them."""

    def later(events: list[EventRecord]) -> list[EventRecord]:
        return [e for e in events if datetime.fromisoformat(e.at) >= at]

    return later(await health_events_until(store, lambda events: wanted(later(events))))


def alive(report: ComponentReport) -> bool:
    return report.liveness is Liveness.OK and report.pid is not None


async def test_an_embedded_component_hung_past_its_timeout_is_killed_and_restarted(
    harness: Harness, start_appliance: StartAppliance, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGSTOP: the child has not exited, so only the silent heartbeat shows it; the repair
    kills it and the supervisor starts a new one at once."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the children import tests.support.echo
    settings = harness.settings(
        embedded_components=str(CACHE),
        component_runtime=ECHO,
        test_mode=True,
        component_heartbeat_interval_s=0.2,
        component_timeout_s=TIMEOUT_S,
        component_restart_backoff_s=RESTART_BACKOFF_S,
        component_repair_backoff_s=TIMEOUT_S,
        metrics_bind="127.0.0.1:0",
    )
    running = await start_appliance(settings)
    board = running.appliance.health
    store = StateStore(connect(harness.redis_url), Keys(harness.prefix))
    pids: list[int] = []
    try:
        health = ComponentHealth(store, TIMEOUT_S)
        first = await health.wait_until(CACHE, alive, WAIT_S)
        await asyncio.wait_for(board.wait_ok(str(CACHE)), WAIT_S)
        assert first.pid is not None
        pids.append(first.pid)
        stopped_at = time.monotonic()
        at = datetime.now(UTC)
        os.kill(first.pid, signal.SIGSTOP)

        events = await events_since(store, at, repaired(str(CACHE)))
        back_s = time.monotonic() - stopped_at
        assert kinds_of(events, str(CACHE)) == [
            "component_failed",
            "component_repair_started",
            "component_recovered",
            "component_repaired",
        ]
        failed, started, _, done = [e for e in events if e.fields["component"] == str(CACHE)]
        assert "no heartbeat" in failed.fields["detail"]
        assert started.fields["attempt"] == 1
        assert started.fields["action"].startswith(f"killed pid {first.pid}")
        assert done.fields["attempts"] == 1 and 0 < done.fields["seconds"] < back_s
        print(f"SIGSTOP: failed {failed.at}, repaired {done.fields['seconds']:.2f}s later, "
              f"{back_s:.2f}s after the stop (timeout {TIMEOUT_S}s)")  # fmt: skip
        again = await health.wait_until(CACHE, lambda r: alive(r) and r.pid != first.pid, WAIT_S)
        assert again.pid is not None
        pids.append(again.pid)
        assert not Path(f"/proc/{first.pid}").exists()  # killed and reaped
        assert board.is_ok(str(CACHE)) and board.failed_since(str(CACHE)) is None
        assert back_s < RESTART_BACKOFF_S  # the repair's restart, not one after a backoff

        runtime = json.loads((harness.data_dir / RUNTIME_FILE).read_text())
        samples = await scrape(runtime["metrics_address"])
        component = (("component", str(CACHE)),)
        assert samples[("ferry_component_failures_total", component)] == 1
        assert samples[("ferry_component_repair_attempts_total", component)] == 1
        outcome = (("component", str(CACHE)), ("outcome", "repaired"))
        assert samples[("ferry_component_repairs_total", outcome)] == 1
        await running.shutdown()
    finally:
        kill_pids(pids, harness.data_dir)
        await store.close()


def echo_command(harness: Harness, tmp_path: Path, instance: ComponentId) -> ComponentCommand:
    """The component as a process on 'its own host': the echo runtime, our Redis."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
    env |= {
        "PYTHONPATH": str(ROOT),
        "FERRY_REDIS_URL": harness.redis_url,
        "FERRY_REDIS_PREFIX": harness.prefix,
        "FERRY_DATA_DIR": str(tmp_path / "components"),
        "FERRY_TEST_MODE": "1",
        "FERRY_COMPONENT_HEARTBEAT_INTERVAL_S": "0.2",
        "FERRY_COMPONENT_TIMEOUT_S": str(TIMEOUT_S),
    }
    return component_command(
        instance,
        data_dir=tmp_path / "components" / instance.kind / instance.name,
        nbd_bind="127.0.0.1:0",
        env=env,
        log_file=tmp_path / f"{instance.kind}-{instance.name}.log",
        extra=("--runtime", ECHO),
        cwd=ROOT,
    )


def start_config(tmp_path: Path, command: ComponentCommand) -> Path:
    config = tmp_path / "start.json"
    entry = {
        "argv": list(command.argv),
        "env": dict(command.env),
        "cwd": str(command.cwd),
        "log": str(command.log_file),
    }
    config.write_text(json.dumps({str(command.instance): entry}))
    return config


async def test_a_remote_component_is_restarted_by_the_repair_command(
    harness: Harness, start_appliance: StartAppliance, tmp_path: Path
) -> None:
    command = echo_command(harness, tmp_path, CACHE)
    config = start_config(tmp_path, command)
    template = f"{sys.executable} {START_SCRIPT} {config} {{kind}} {{name}}"
    start = await asyncio.create_subprocess_exec(
        *template.format(kind="cache", name="cache-1").split()
    )
    assert await start.wait() == 0
    settings = harness.settings(
        remote_components=str(CACHE),
        component_timeout_s=TIMEOUT_S,
        component_repair_command=template,
        component_repair_backoff_s=TIMEOUT_S,
    )
    running = await start_appliance(settings)
    store = StateStore(connect(harness.redis_url), Keys(harness.prefix))
    pids: list[int] = []
    try:
        health = ComponentHealth(store, TIMEOUT_S)
        first = await health.wait_until(CACHE, alive, WAIT_S)
        assert first.pid is not None
        pids.append(first.pid)
        async with FerryClient(harness.client_settings()) as client:
            await beat_until(client, lambda b: b.body.status is ReadyStatus.READY)
            at = datetime.now(UTC)
            os.kill(first.pid, signal.SIGKILL)
            events = await events_since(store, at, repaired(str(CACHE)))
            again = await health.wait_until(CACHE, lambda r: alive(r) and r.pid != first.pid, 30)
            assert again.pid is not None
            pids.append(again.pid)
            back = await beat_until(client, lambda b: b.body.status is ReadyStatus.READY)
            assert states(back)[str(CACHE)] is ComponentState.OK
        assert kinds_of(events, str(CACHE)) == [
            "component_failed",
            "component_repair_started",
            "component_recovered",
            "component_repaired",
        ]
        _, started, _, done = [e for e in events if e.fields["component"] == str(CACHE)]
        assert started.fields["attempt"] == 1 and started.fields["exit_code"] == 0
        assert started.fields["action"] == f"ran {template.format(kind='cache', name='cache-1')}"
        assert started.fields["output"] == f"started cache/cache-1 as pid {again.pid}\n"
        assert done.fields["attempts"] == 1 and done.fields["seconds"] >= 0
        print(f"repair command: repaired {done.fields['seconds']:.2f}s after it failed")
        await running.shutdown()
    finally:
        kill_pids(pids, tmp_path)
        await store.close()


async def test_a_repair_command_that_keeps_failing_is_retried_with_backoff_then_given_up(
    harness: Harness, start_appliance: StartAppliance, tmp_path: Path
) -> None:
    command = echo_command(harness, tmp_path, CACHE)
    config = start_config(tmp_path, command)
    starter = f"{sys.executable} {START_SCRIPT} {config} cache cache-1"
    start = await asyncio.create_subprocess_exec(*starter.split())
    assert await start.wait() == 0
    # The command prints a secret it was given (here in its argv): cut out of the log and
    # the events; its environment lacks the bus token.
    code = (
        "import os, sys; print('no route to', sys.argv[1], 'with', sys.argv[2], "
        "os.environ.get('FERRY_BUS_TOKEN', 'no token in env')); sys.exit(3)"
    )
    template = f'{sys.executable} -c "{code}" {{name}} {TOKEN}'
    settings = harness.settings(
        remote_components=str(CACHE),
        component_timeout_s=TIMEOUT_S,
        component_repair_command=template,
        component_repair_backoff_s=0.5,
        component_repair_backoff_max_s=1.0,
        component_repair_timeout_s=4.0,
    )
    running = await start_appliance(settings)
    board = running.appliance.health
    store = StateStore(connect(harness.redis_url), Keys(harness.prefix))
    pids: list[int] = []
    try:
        first = await ComponentHealth(store, TIMEOUT_S).wait_until(CACHE, alive, WAIT_S)
        assert first.pid is not None
        pids.append(first.pid)
        await asyncio.wait_for(board.wait_ok(str(CACHE)), WAIT_S)
        at = datetime.now(UTC)
        os.kill(first.pid, signal.SIGKILL)
        await asyncio.wait_for(board.wait_unrepairable(str(CACHE)), WAIT_S)

        def gave_up(events: list[EventRecord]) -> bool:
            return HealthEvent.COMPONENT_REPAIR_GAVE_UP in kinds_of(events, str(CACHE))

        events = await events_since(store, at, gave_up)
        mine = [e for e in events if e.fields.get("component") == str(CACHE)]
        assert mine[0].kind == "component_failed" and mine[-1].kind == "component_repair_gave_up"
        attempts = [e for e in mine if e.kind == "component_repair_started"]
        assert len(attempts) >= 3 and [e.kind for e in mine[1:-1]] == [
            "component_repair_started"
        ] * len(attempts)
        assert [e.fields["attempt"] for e in attempts] == list(range(1, len(attempts) + 1))
        for attempt in attempts:
            assert attempt.fields["exit_code"] == 3
            assert attempt.fields["output"] == f"no route to cache-1 with {MASK} no token in env\n"
            assert TOKEN not in attempt.fields["action"] and MASK in attempt.fields["action"]
        times = [datetime.fromisoformat(e.at) for e in attempts]
        gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
        assert gaps[0] >= 0.5 and all(gap >= 1.0 for gap in gaps[1:])  # 0.5, then its max 1
        end = mine[-1].fields
        assert end["attempts"] == len(attempts) and end["seconds"] >= 4.0
        assert (
            end["reason"].startswith("not back")
            and f"{len(attempts)} repair attempts" in end["reason"]
        )
        assert board.unrepairable(str(CACHE)) and board.is_failed(str(CACHE))
        assert board.failed_since(str(CACHE)) is not None
        summary = board.summary()
        assert summary[0] == "Services not ready or down cache/cache-1"
        assert "unrepairable" in summary[1]
        await running.shutdown()
    finally:
        kill_pids(pids, tmp_path)
        await store.close()


def gone(pid: int) -> bool:
    """Exited: no such process, or a zombie nobody reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


async def test_a_hung_component_left_by_an_earlier_appliance_is_killed_and_replaced(
    harness: Harness,
    start_appliance: StartAppliance,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The appliance that started the component died; its child kept serving, and ours
    keep finding the data directory busy (not a failure). Then that process hangs: the
    repair kills it (a process of this component on this host) and ours takes over."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    overrides: dict[str, object] = {
        "embedded_components": str(CACHE),
        "component_runtime": ECHO,
        "test_mode": True,
        "component_heartbeat_interval_s": 0.2,
        "component_timeout_s": TIMEOUT_S,
        "component_restart_backoff_s": 0.2,
        "component_repair_backoff_s": TIMEOUT_S,
    }
    earlier = ApplianceProcess(harness, tmp_path / "appliance-0.log", **overrides)
    store = StateStore(connect(harness.redis_url), Keys(harness.prefix))
    pids: list[int] = []
    try:
        await earlier.start()
        health = ComponentHealth(store, TIMEOUT_S)
        left = await health.wait_until(CACHE, alive, WAIT_S)
        assert left.pid is not None
        pids.append(left.pid)
        earlier.kill()
        running = await start_appliance(harness.settings(**overrides))
        board = running.appliance.health
        await asyncio.wait_for(board.wait_ok(str(CACHE)), WAIT_S)  # the one left serving
        at = datetime.now(UTC)
        os.kill(left.pid, signal.SIGSTOP)

        events = await events_since(store, at, repaired(str(CACHE)))
        assert kinds_of(events, str(CACHE)) == [
            "component_failed",
            "component_repair_started",
            "component_recovered",
            "component_repaired",
        ]
        (started,) = [e for e in events if e.kind == "component_repair_started"]
        assert started.fields["action"] == (
            f"killed pid {left.pid} (left by an earlier appliance, not beating)"
        )
        ours = await health.wait_until(CACHE, lambda r: alive(r) and r.pid != left.pid, WAIT_S)
        assert ours.pid is not None
        pids.append(ours.pid)
        assert gone(left.pid)
        await running.shutdown()
        assert gone(ours.pid)  # ours: stopped with the appliance
    finally:
        earlier.kill()
        kill_pids(pids, harness.data_dir)
        await store.close()


async def test_the_embedded_state_store_is_restarted_with_its_data(
    harness: Harness, start_appliance: StartAppliance
) -> None:
    """The appliance's own redis-server (no FERRY_REDIS_URL) is SIGKILLed: the repair starts
    it again on its port and data directory; the state (the generation marker) is there,
    and the events noticed while it was down are written once it is back, in order."""
    running = await start_appliance(harness.settings(redis_url=None))
    board = running.appliance.health
    redis = running.appliance.embedded_redis
    assert redis is not None and redis.pid is not None
    failed, back = asyncio.Event(), asyncio.Event()

    def changed(before: ComponentHealth_, after: ComponentHealth_) -> None:
        if after.name == "state_store" and after.state is ComponentState.FAILED:
            failed.set()
        elif after.name == "state_store" and failed.is_set() and after.state is ComponentState.OK:
            back.set()

    board.subscribe(changed)
    await asyncio.wait_for(board.wait_ok("state_store"), WAIT_S)
    assert board.is_ok("state_generation")
    old = redis.pid
    at = datetime.now(UTC)
    os.kill(old, signal.SIGKILL)
    await asyncio.wait_for(back.wait(), WAIT_S)
    assert redis.pid is not None and redis.pid != old
    store = StateStore(connect(redis.url), Keys(harness.prefix))
    try:
        events = await events_since(store, at, repaired("state_store"))
    finally:
        await store.close()
    kinds = kinds_of(events, "state_store")
    assert kinds[0] == "component_failed" and kinds[-1] == "component_repaired"
    # Back while the attempt still ran (it waits until redis-server listens): an attempt's
    # event is written once it has run.
    assert sorted(kinds[1:-1]) == ["component_recovered", "component_repair_started"]
    (started,) = [e for e in events if e.kind == "component_repair_started"]
    assert started.fields["action"] == "restarted redis-server (it had exited with code -9)"
    assert board.is_ok("state_generation")  # its data came back: not a Redis that lost it
    await running.shutdown()
