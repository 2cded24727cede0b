"""Components as real supervised processes: orders, heartbeats, SIGKILL, SIGSTOP.

A component process is started with ``python -m appliance.cli component cache ...``
and the EchoRuntime (``--runtime``, honoured in test mode only); the Supervisor
keeps it running; the control plane talks to it through Redis only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import structlog.testing

from appliance.components.control import ComponentOrders
from appliance.components.heartbeat import ComponentHealth, ComponentReport, Liveness
from appliance.components.orders import ComponentId, Order, OrderAction, OutcomeKind
from appliance.embedded import RedisServer
from appliance.service.components import Supervisor, component_command
from appliance.state.keys import Keys
from appliance.state.leases import Lease, Leases
from appliance.state.store import StateStore, connect
from tests.integration.conftest import Harness, RunningAppliance
from tests.support.echo import applied_orders

ROOT = Path(__file__).resolve().parents[2]
CACHE = ComponentId("cache", "cache-1")
TIMEOUT_S = 1.5  # heartbeat timeout: silent this long = failed
WAIT_S = 60.0  # bound on every wait (a loaded 2-core machine starts Python slowly)


def component_env(redis_server: RedisServer, keys: Keys, data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
    return env | {
        "PYTHONPATH": str(ROOT),
        "FERRY_REDIS_URL": redis_server.url,
        "FERRY_REDIS_PREFIX": keys.prefix,
        "FERRY_DATA_DIR": str(data_dir),
        "FERRY_TEST_MODE": "1",
        "FERRY_COMPONENT_HEARTBEAT_INTERVAL_S": "0.2",
        "FERRY_COMPONENT_TIMEOUT_S": str(TIMEOUT_S),
        "FERRY_COMPONENT_RECONCILE_INTERVAL_S": "30",
        "FERRY_LOG_LEVEL": "info",
    }


@dataclass
class Running:
    supervisor: Supervisor
    store: StateStore
    orders: ComponentOrders
    health: ComponentHealth
    data_dir: Path
    log_file: Path


@pytest.fixture
async def running(
    redis: aioredis.Redis, redis_server: RedisServer, keys: Keys, tmp_path: Path
) -> AsyncIterator[Running]:
    data_dir = tmp_path / "cache-1"
    log_file = tmp_path / "cache-1.log"
    command = component_command(
        CACHE,
        data_dir=data_dir,
        nbd_bind="127.0.0.1:0",
        env=component_env(redis_server, keys, tmp_path),
        log_file=log_file,
        extra=("--runtime", "tests.support.echo:EchoRuntime"),
        cwd=ROOT,
    )
    supervisor = Supervisor([command], backoff_s=0.1, backoff_max_s=1.0, stop_grace_s=10.0)
    store = StateStore(connect(redis_server.url), keys)
    stop = asyncio.Event()
    task = asyncio.create_task(supervisor.run(stop))
    try:
        yield Running(
            supervisor,
            store,
            ComponentOrders(store, CACHE),
            ComponentHealth(store, timeout_s=TIMEOUT_S),
            data_dir,
            log_file,
        )
    finally:
        stop.set()
        await task
        await store.close()
        if log_file.exists():
            print(log_file.read_text()[-4000:])  # shown when the test failed


async def lease_for(store: StateStore) -> Lease:
    lease = await Leases(store, "ferry-a", ttl_s=300).acquire("group:g-1")
    assert lease is not None
    return lease


def order(lease: Lease, action: OrderAction, request: int = 0) -> Order:
    return Order("disk-1", action, "m-1", lease.token, lease.resource, request)


def alive(report: ComponentReport) -> bool:
    return report.liveness is Liveness.OK


async def test_a_supervised_component_applies_orders_once_across_kill_and_stop(
    running: Running,
) -> None:
    sup, orders, health = running.supervisor, running.orders, running.health
    pid = await sup.wait_running(CACHE, timeout_s=WAIT_S)
    first = await health.wait_until(CACHE, lambda r: alive(r) and r.pid == pid, WAIT_S)
    assert first.figures["runtime"] == "echo" and first.figures["exports"] == []

    lease = await lease_for(running.store)
    opened = await orders.give_and_wait(order(lease, OrderAction.OPEN), WAIT_S)
    cut = await orders.give_and_wait(order(lease, OrderAction.CUT_EPOCH, 1), WAIT_S)
    assert opened.kind is OutcomeKind.APPLIED and cut.result["epoch"] == 1
    figures = await health.wait_until(
        CACHE, lambda r: r.figures.get("committed_epoch") == {"disk-1": 1}, WAIT_S
    )
    assert figures.figures["exports"] == ["disk-1"]

    # Frozen, it cannot take the next order; killed, the supervisor restarts it, and the
    # new process reconciles the desired state it missed without redoing what it did.
    os.kill(pid, signal.SIGSTOP)
    second = order(lease, OrderAction.CUT_EPOCH, 2)
    assert await orders.give(second)
    os.kill(pid, signal.SIGKILL)
    new_pid = await sup.wait_running(CACHE, not_pid=pid, timeout_s=WAIT_S)
    outcome = await orders.wait(second, WAIT_S)
    assert outcome.kind is OutcomeKind.APPLIED and outcome.result["epoch"] == 2
    assert sup.restarts(CACHE) == 1 and sup.exit_codes(CACHE) == [-signal.SIGKILL]
    assert [(o["action"], o["epoch_request"]) for o in applied_orders(running.data_dir)] == [
        ("open", 0),
        ("cut_epoch", 1),
        ("cut_epoch", 2),
    ]
    assert applied_orders(running.data_dir)[-1]["pid"] == new_pid

    # SIGSTOP: its heartbeat goes silent, the reader says failed; SIGCONT: back to ok.
    await health.wait_until(CACHE, lambda r: alive(r) and r.pid == new_pid, WAIT_S)
    os.kill(new_pid, signal.SIGSTOP)
    try:
        failed = await health.wait_until(CACHE, lambda r: r.failed, WAIT_S)
        assert failed.silent_s is not None and failed.silent_s > TIMEOUT_S
        assert failed.pid == new_pid and "no heartbeat" in failed.detail
    finally:
        os.kill(new_pid, signal.SIGCONT)
    back = await health.wait_until(CACHE, alive, WAIT_S)
    assert back.pid == new_pid and back.sequence > failed.sequence
    assert sup.pid(CACHE) == new_pid and sup.restarts(CACHE) == 1  # stopped is not exited


async def test_the_supervisor_stops_its_children_by_pid(
    redis: aioredis.Redis, redis_server: RedisServer, keys: Keys, tmp_path: Path
) -> None:
    command = component_command(
        CACHE,
        data_dir=tmp_path / "c",
        nbd_bind="127.0.0.1:0",
        env=component_env(redis_server, keys, tmp_path),
        log_file=tmp_path / "c.log",
        extra=("--runtime", "tests.support.echo:EchoRuntime"),
        cwd=ROOT,
    )
    supervisor = Supervisor([command], backoff_s=0.1, backoff_max_s=1.0)
    stop = asyncio.Event()
    task = asyncio.create_task(supervisor.run(stop))
    store = StateStore(connect(redis_server.url), keys)
    try:
        pid = await supervisor.wait_running(CACHE, timeout_s=WAIT_S)
        health = ComponentHealth(store, timeout_s=TIMEOUT_S)
        await health.wait_until(CACHE, lambda r: alive(r) and r.pid == pid, WAIT_S)
        stop.set()
        await task
        assert supervisor.pid(CACHE) is None and supervisor.restarts(CACHE) == 0
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        last = await health.report(CACHE)
        assert last.liveness is Liveness.STOPPING  # its last words: stopping
    finally:
        stop.set()
        with contextlib.suppress(BaseException):
            await task
        await store.close()


@pytest.fixture
def plain_env(redis_server: RedisServer, keys: Keys, tmp_path: Path) -> Iterator[dict[str, str]]:
    env = component_env(redis_server, keys, tmp_path)
    del env["FERRY_TEST_MODE"]
    yield env


def test_a_runtime_named_outside_test_mode_is_refused(plain_env: dict[str, str]) -> None:
    argv = [sys.executable, "-m", "appliance.cli", "component", "cache", "--name", "cache-9"]
    argv += ["--runtime", "tests.support.echo:EchoRuntime"]
    done = subprocess.run(argv, env=plain_env, cwd=ROOT, capture_output=True, timeout=60)
    assert done.returncode == 1
    assert b"FERRY_TEST_MODE" in done.stderr


async def test_the_appliance_runs_its_embedded_components(
    harness: Harness,
    start_appliance: Callable[..., Awaitable[RunningAppliance]],
    redis: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the children import tests.support.echo
    settings = harness.settings(
        embedded_components="cache/cache-1",
        component_runtime="tests.support.echo:EchoRuntime",
        test_mode=True,
        component_heartbeat_interval_s=0.2,
        # Silent this long, the repair kills and restarts it: longer than a loaded
        # machine's stalls, so only the test's SIGKILL restarts it here.
        component_timeout_s=30.0,
        component_restart_backoff_s=0.1,
    )
    running = await start_appliance(settings)
    board = running.appliance.health
    store = StateStore(connect(harness.redis_url), Keys(harness.prefix))
    try:
        health = ComponentHealth(store, timeout_s=TIMEOUT_S)
        first = await health.wait_until(CACHE, alive, WAIT_S)
        await asyncio.wait_for(board.wait_ok("cache/cache-1"), WAIT_S)
        assert first.pid is not None and first.figures["runtime"] == "echo"
        lease = await lease_for(store)
        outcome = await ComponentOrders(store, CACHE).give_and_wait(
            order(lease, OrderAction.OPEN), WAIT_S
        )
        assert outcome.kind is OutcomeKind.APPLIED
        os.kill(first.pid, signal.SIGKILL)
        again = await health.wait_until(CACHE, lambda r: alive(r) and r.pid != first.pid, WAIT_S)
        assert again.figures["exports"] == ["disk-1"]  # the echo core's journal survived
        await running.shutdown()
        assert again.pid is not None
        with pytest.raises(ProcessLookupError):
            os.kill(again.pid, 0)
    finally:
        await store.close()


async def test_a_component_that_keeps_exiting_is_restarted_with_growing_backoff(
    plain_env: dict[str, str], tmp_path: Path
) -> None:
    env = plain_env.copy()
    del env["FERRY_REDIS_URL"]  # it cannot run: it says so and exits 1
    log_file = tmp_path / "broken.log"
    command = component_command(
        CACHE, data_dir=tmp_path / "b", nbd_bind="127.0.0.1:0", env=env, log_file=log_file
    )
    supervisor = Supervisor([command], backoff_s=0.05, backoff_max_s=0.15)
    stop = asyncio.Event()
    with structlog.testing.capture_logs() as captured:
        task = asyncio.create_task(supervisor.run(stop))
        try:
            await supervisor.wait_exits(CACHE, 4, timeout_s=WAIT_S)
        finally:
            stop.set()
            await task
    assert supervisor.exit_codes(CACHE)[:4] == [1, 1, 1, 1]
    assert supervisor.backoffs(CACHE)[:4] == [0.05, 0.1, 0.15, 0.15]
    restarts = [e for e in captured if e["event"] == "component exited; restarting"]
    assert [e["restarts"] for e in restarts][:4] == [1, 2, 3, 4]
    assert restarts[0]["code"] == 1 and restarts[0]["component"] == "cache/cache-1"
    assert b"FERRY_REDIS_URL" in log_file.read_bytes()
