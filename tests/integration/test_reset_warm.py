"""A reset with two warm VMs: one cut over (running on its volume), one still reconciling.

The cut-over one keeps running in the cloud on its volume (the finished copy is never
removed): its source is finished as a commit would (migrate pool, off, no snapshot), the
components let go of its disks, its request hears it completed. The reconciling one is
brought home to its last committed epoch: its cloud VM and its unfinished volume are
removed, its source waits powered off in the migrate pool with its snapshot kept, its
request hears it failed by the reset. Both cache disks are gone, so are the components'
order keys. On LocalStack, a real redis-server and the real component processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.orchestrator.record import MigrationRecord
from appliance.orchestrator.states import Step
from appliance.sites.lab.site import LabSite
from appliance.state.migrations import MigrationStore
from appliance.state.store import StateStore
from clients.client import FerryClient
from messages.commands import (
    CloneOptions,
    CloneVm,
    NetworkMapping,
    ResetRequest,
    ResetRequestBody,
    SourceCloneRequest,
    SourceCloneRequestBody,
)
from messages.common import MigrationState, MigrationType, PowerState
from messages.events import CommandResponse, ResetOutcome
from tests.integration.conftest import Harness
from tests.integration.migration_helpers import start_migration
from tests.integration.tbc_helpers import TBC_SETTINGS, components_up, kill_pids, state_store
from tests.integration.test_bus import StartAppliance
from tests.support.lab import MIB, NETWORK_MAP, build_lab, lab_vm
from tests.support.records import until_record

pytestmark = pytest.mark.timeout(300)
WARM_SETTINGS: dict[str, object] = {
    **TBC_SETTINGS,
    "debug_warm_cutover_gate": True,  # a warm VM reconciles until its gates are opened
    "warm_reconcile_threshold_bytes": 4 * MIB,
}


@pytest.fixture
def component_pids(data_dir: Path) -> Iterator[list[int]]:
    pids: list[int] = []
    yield pids
    kill_pids(pids, data_dir)


def _warm(client: FerryClient, vm_ids: list[str]) -> SourceCloneRequest:
    return SourceCloneRequest(
        body=SourceCloneRequestBody(
            vms=tuple(CloneVm(vm_id=vm_id) for vm_id in vm_ids),
            migration_type=MigrationType.WARM,
            guest_credentials=client.seal_credentials("tester", "pw-123"),
            network_map=tuple(NetworkMapping(source=s, target=t) for s, t in NETWORK_MAP.items()),
            options=CloneOptions(),
        )
    )


async def _until(
    store: StateStore, migration_id: str, check: Callable[[MigrationRecord], bool]
) -> MigrationRecord:
    """A bounded watch on the persisted record."""

    def reached(record: MigrationRecord) -> bool:
        if check(record):
            return True
        assert record.step not in (Step.FAILED, Step.ROLLING_BACK), record
        return False

    return await until_record(store, migration_id, reached)


async def test_a_reset_keeps_a_cut_over_warm_vm_and_brings_a_reconciling_one_home(
    harness: Harness, start_appliance: StartAppliance, component_pids: list[int]
) -> None:
    vms = [lab_vm(n, disks=1, disk_size=8 * MIB) for n in (1, 2)]
    await build_lab(harness.data_dir, vms)
    running = await start_appliance(harness.settings(**WARM_SETTINGS))
    async with FerryClient(harness.client_settings()) as client, state_store(harness) as store:
        component_pids += (await components_up(store)).values()
        follower = await start_migration(client, _warm(client, [vm.vm_id for vm in vms]))
        await follower.until(lambda latest: len(latest) == 2)
        by_vm = {s.vm_id: s.migration_id for s in follower.latest.values()}
        done, held = by_vm[vms[0].vm_id], by_vm[vms[1].vm_id]
        for gate in ("cutover", "cutover_off"):
            await MigrationStore(store).ask(done, gate, "1")
        cut = await _until(store, done, lambda r: r.step is Step.CUT_OVER)
        reconciling = await _until(store, held, lambda r: r.step is Step.RECONCILING)

        answer = await client.request(ResetRequest(body=ResetRequestBody(confirm=True)), 240)
        assert isinstance(answer, CommandResponse)
        items = {item.migration_id: item for item in answer.body.undone}
        assert items[done].outcome is ResetOutcome.KEPT_IN_CLOUD and items[done].error is None
        assert "kept the finished cloud copy running on its volumes" in items[done].actions
        assert items[held].outcome is ResetOutcome.RETURNED and items[held].error is None
        assert items[held].epoch is not None
        volume = reconciling.disks[0].volume_id
        assert volume == f"{vms[1].name}_ARM"  # warm volumes are named after their VM
        assert f"deleted cloud volume {volume}" in items[held].actions
        latest = await follower.until(
            lambda latest: (
                latest[done].state is MigrationState.COMPLETED
                and latest[held].state is MigrationState.FAILED
            )
        )
        error = latest[held].error
        assert error is not None and error.code == "reset"
    await running.shutdown()

    cloud = LabSite.open(harness.data_dir / "sites" / "cloud")
    onprem = LabSite.open(harness.data_dir / "sites" / "onprem")
    try:
        assert [vm.vm_id for vm in await cloud.list_vms()] == [done]
        kept = await cloud.get_vm(done)
        assert kept.power_state is PowerState.ON
        assert [d.volume_id for d in kept.disks] == [cut.disks[0].volume_id]
        assert [v.volume_id for v in await cloud.list_volumes()] == [cut.disks[0].volume_id]
        for vm in vms:
            source = await onprem.get_vm(vm.vm_id)
            assert source.resource_pool == "_HDM_MIGRATEPOOL"
            assert source.power_state is PowerState.OFF
            assert source.tag("ferry.migration") is None
        assert await onprem.vm_snapshot_names(vms[0].vm_id) == []
        assert await onprem.vm_snapshot_names(vms[1].vm_id) == [f"ferry-{held}"]
    finally:
        await cloud.close()
        await onprem.close()
    cache_dir = harness.data_dir / "components" / "cache" / "cache-1" / "disks"
    for migration_id in (done, held):
        assert not (cache_dir / migration_id / f"{migration_id}-disk-0").exists()
