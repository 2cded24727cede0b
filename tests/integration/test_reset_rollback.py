"""A reset of a tbc migration caught before its VM ran in the cloud undoes it, components
included: the I/O manager lets go of the disk, the source is as it was (its pool, powered
back on, no snapshot, its bytes untouched), and the cache, stopped and silent, finds a
close order for the disk when it resumes. The migration is held at OPENING_DISKS by the
cache being SIGSTOPped before it starts (its open order cannot be carried out). On
LocalStack, a real redis-server and the real component processes.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.components.control import ComponentOrders
from appliance.components.orders import OrderAction, OutcomeKind
from appliance.orchestrator.states import Step
from appliance.sites.lab.site import LabSite
from appliance.state.store import StateStore
from clients.client import FerryClient
from messages.commands import ResetRequest, ResetRequestBody
from messages.common import MigrationState, PowerState
from messages.events import CommandResponse, ResetOutcome
from tests.integration.conftest import Harness
from tests.integration.migration_helpers import start_migration
from tests.integration.tbc_helpers import (
    CACHE,
    ONPREM,
    TBC_SETTINGS,
    components_up,
    kill_pids,
    read_onprem,
    state_store,
    tbc_request,
)
from tests.integration.test_bus import StartAppliance
from tests.support.lab import MIB, build_lab, lab_vm
from tests.support.records import until_record

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def component_pids(data_dir: Path) -> Iterator[list[int]]:
    pids: list[int] = []
    yield pids
    kill_pids(pids, data_dir)


async def _step(store: StateStore, migration_id: str, step: Step) -> None:
    await until_record(store, migration_id, lambda record: record.step is step)


async def test_a_reset_before_the_vm_ran_in_the_cloud_undoes_it_components_included(
    harness: Harness, start_appliance: StartAppliance, component_pids: list[int]
) -> None:
    vm = lab_vm(1, disks=1, disk_size=8 * MIB)
    await build_lab(harness.data_dir, [vm])
    base = await read_onprem(harness.data_dir, vm.vm_id, "disk-0")
    settings = harness.settings(**{**TBC_SETTINGS, "component_order_timeout_s": 8.0})
    running = await start_appliance(settings)
    async with FerryClient(harness.client_settings()) as client, state_store(harness) as store:
        pids = await components_up(store)
        component_pids += pids.values()
        cache_pid = pids[str(CACHE)]
        os.kill(cache_pid, signal.SIGSTOP)
        try:
            follower = await start_migration(client, tbc_request(client, [vm.vm_id]))
            (migration_id,) = follower.latest
            await _step(store, migration_id, Step.OPENING_DISKS)
            reset = ResetRequest(body=ResetRequestBody(confirm=True))
            answer = await client.request(reset, 240)
        finally:
            os.kill(cache_pid, signal.SIGCONT)
        assert isinstance(answer, CommandResponse)
        (item,) = answer.body.undone
        assert item.migration_id == migration_id
        assert item.outcome is ResetOutcome.UNDONE and item.error is None, item
        assert f"{ONPREM} closed disk-0" in item.actions
        assert any(a.startswith(f"{CACHE} did not close disk-0") for a in item.actions)
        assert "powered source VM back on" in item.actions
        assert f"deleted source snapshot ferry-{migration_id}" in item.actions
        latest = await follower.until(
            lambda latest: latest[migration_id].state is MigrationState.FAILED
        )
        error = latest[migration_id].error
        assert error is not None and error.code == "reset"

        # Resumed, the cache finds the close order the reset left for it, and obeys.
        orders = ComponentOrders(store, CACHE)
        order = await orders.desired(f"{migration_id}-disk-0")
        assert order is not None and order.action is OrderAction.CLOSE
        outcome = await orders.wait(order, 60)
        assert outcome.kind is OutcomeKind.APPLIED, outcome
    await running.shutdown()

    onprem = LabSite.open(harness.data_dir / "sites" / "onprem")
    try:
        source = await onprem.get_vm(vm.vm_id)
        assert source.resource_pool == vm.resource_pool
        assert source.power_state is PowerState.ON
        assert source.tag("ferry.migration") is None
        assert await onprem.vm_snapshot_names(vm.vm_id) == []
    finally:
        await onprem.close()
    assert await read_onprem(harness.data_dir, vm.vm_id, "disk-0") == base
