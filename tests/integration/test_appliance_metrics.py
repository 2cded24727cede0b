"""The appliance's /metrics over HTTP: a completed cold migration shows in the by-state gauge
(LocalStack + a real redis-server); component health and the supervisor's restart count read
from real component processes, one of them killed and restarted."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from appliance.clock import SystemClock
from appliance.components.heartbeat import ComponentHealth, ComponentReport, Liveness
from appliance.embedded import RedisServer
from appliance.metrics import MetricsEndpoint
from appliance.orchestrator.figures import CacheFigureReader
from appliance.service.metrics import ApplianceCollector, appliance_registry
from appliance.service.runtime import RUNTIME_FILE
from appliance.state.keys import Keys
from appliance.state.migrations import MigrationStore
from appliance.state.store import StateStore, connect
from clients.client import FerryClient
from messages.common import MigrationState
from tests.integration.conftest import Harness, RunningAppliance
from tests.integration.migration_helpers import clone_request, start_migration
from tests.integration.test_cold_migration import GatedWan
from tests.support.components import (
    CACHE,
    ONPREM,
    ROOT,
    TIMEOUT_S,
    WAIT_S,
    component_pair,
)
from tests.support.lab import MIB, build_lab, lab_vm
from tests.support.scrape import scrape

StartAppliance = Callable[..., Awaitable[RunningAppliance]]
COMPLETED = ("ferry_migrations", (("state", "completed"),))


async def test_a_completed_cold_migration_shows_in_the_appliance_metrics(
    harness: Harness, start_appliance: StartAppliance
) -> None:
    vm = lab_vm(1, disks=1, disk_size=8 * MIB)
    await build_lab(harness.data_dir, [vm])
    wan = GatedWan()
    await start_appliance(harness.settings(metrics_bind="127.0.0.1:0"), wan=wan)
    runtime = json.loads((harness.data_dir / RUNTIME_FILE).read_text())
    address = runtime["metrics_address"]
    before = await scrape(address)
    assert before[("ferry_metrics_state_store_up", ())] == 1
    assert COMPLETED not in before

    async with FerryClient(harness.client_settings()) as client:
        follower = await start_migration(client, clone_request(client, [vm.vm_id]))
        await wan.gate.reached(1)  # held at its transfer: unfinished, its bytes planned
        held = await scrape(address)
        active = {k[1]: v for k, v in held.items() if k[0] == "ferry_migrations_active"}
        assert list(active.values()) == [1]
        (labels,) = active
        assert dict(labels)["type"] == "cold"
        assert held[("ferry_migrations", (("state", dict(labels)["state"]),))] == 1
        assert held[("ferry_transfer_planned_bytes", (("type", "cold"),))] > 0
        assert held[("ferry_transfer_done_bytes", (("type", "cold"),))] == 0
        wan.gate.open()
        (status,) = (await follower.finished(1)).values()
    assert status.state is MigrationState.COMPLETED, status.error

    after = await scrape(address)
    assert after[COMPLETED] == 1
    assert (
        status.bytes_done
        == status.bytes_total
        == held[("ferry_transfer_planned_bytes", (("type", "cold"),))]
    )
    assert ("ferry_migrations", (("state", "failed"),)) not in after
    assert not [key for key in after if key[0] == "ferry_migrations_active"]
    # No component runs: their heartbeats are absent, so they are not healthy.
    assert after[("ferry_component_healthy", (("kind", "cache"), ("name", "cache-1")))] == 0


async def test_component_health_and_restarts_in_the_appliance_metrics(
    redis_server: RedisServer, keys: Keys, tmp_path: Path
) -> None:
    async with component_pair(redis_server, keys, tmp_path) as pair:
        await pair.figures(CACHE)
        await pair.figures(ONPREM)
        supervisor = pair.supervisor
        health = ComponentHealth(pair.store, TIMEOUT_S)
        collector = ApplianceCollector(
            MigrationStore(pair.store),
            health,
            CacheFigureReader(health, SystemClock()),
            [ONPREM, CACHE],
            lambda: {i: supervisor.restarts(i) for i in (ONPREM, CACHE)},
        )
        registry = appliance_registry(collector)
        async with MetricsEndpoint(registry, "127.0.0.1:0", collector.refresh) as endpoint:
            first = await scrape(endpoint.address)
            for instance in (ONPREM, CACHE):
                labels = (("kind", instance.kind), ("name", instance.name))
                assert first[("ferry_component_healthy", labels)] == 1
                assert first[("ferry_component_restarts_total", labels)] == 0

            pid = supervisor.pid(CACHE)
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            await supervisor.wait_exits(CACHE, 1, timeout_s=WAIT_S)
            await pair.wait(CACHE, lambda r: r.pid is not None and r.pid != pid)

            second = await scrape(endpoint.address)
            cache = (("kind", "cache"), ("name", CACHE.name))
            assert second[("ferry_component_restarts_total", cache)] == 1
            assert second[("ferry_component_healthy", cache)] == 1
            onprem = (("kind", "onprem"), ("name", ONPREM.name))
            assert second[("ferry_component_restarts_total", onprem)] == 0


async def test_an_embedded_components_restart_and_its_own_endpoint_through_the_appliance(
    harness: Harness, start_appliance: StartAppliance, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the children import tests.support.echo
    settings = harness.settings(
        embedded_components="cache/cache-1",
        component_runtime="tests.support.echo:EchoRuntime",
        test_mode=True,
        component_heartbeat_interval_s=0.2,
        component_timeout_s=TIMEOUT_S,
        component_restart_backoff_s=0.1,
        metrics_bind="127.0.0.1:0",
        component_metrics_bind="127.0.0.1:0",
    )
    await start_appliance(settings)
    address = json.loads((harness.data_dir / RUNTIME_FILE).read_text())["metrics_address"]
    store = StateStore(connect(harness.redis_url), Keys(harness.prefix))
    cache = (("kind", "cache"), ("name", CACHE.name))
    try:
        health = ComponentHealth(store, timeout_s=TIMEOUT_S)
        first = await health.wait_until(CACHE, _serving, WAIT_S)
        own = await scrape(str(first.figures["metrics_address"]))
        assert own[("ferry_component_up", cache)] == 1
        samples = await scrape(address)
        assert samples[("ferry_component_healthy", cache)] == 1
        assert samples[("ferry_component_restarts_total", cache)] == 0

        assert first.pid is not None
        os.kill(first.pid, signal.SIGKILL)
        again = await health.wait_until(CACHE, lambda r: _serving(r) and r.pid != first.pid, WAIT_S)
        samples = await scrape(address)
        assert samples[("ferry_component_restarts_total", cache)] == 1
        assert samples[("ferry_component_healthy", cache)] == 1
        own = await scrape(str(again.figures["metrics_address"]))
        assert own[("ferry_component_up", cache)] == 1
    finally:
        await store.close()


def _serving(report: ComponentReport) -> bool:
    return report.liveness is Liveness.OK and "metrics_address" in report.figures
