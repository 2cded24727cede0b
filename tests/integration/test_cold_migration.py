"""Cold migration end to end over SQS, on LocalStack + a real redis-server."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

from appliance.datapath.nbd.channel import NbdAddress, TcpAddress
from appliance.datapath.nbd.server import NbdServer
from appliance.sites.lab.site import LabSite
from appliance.sites.model import VmConfig
from appliance.state.events import EventLog
from appliance.state.keys import Keys
from appliance.state.store import StateStore, connect
from appliance.storage.layered import LayeredDisk
from clients.client import FerryClient, FerryError
from messages.common import MigrationState, PowerState
from messages.events import MigrationStatus, SourceCloneResponse
from tests.integration.conftest import Harness, RunningAppliance
from tests.integration.migration_helpers import ApplianceProcess, clone_request, start_migration
from tests.support.faultproxy import FaultProxy
from tests.support.gate import Gate
from tests.support.lab import MIB, build_lab, cloud_volume, disk_digest, lab_vm, onprem_disk
from tests.support.redisfields import field_text

StartAppliance = Callable[..., Awaitable[RunningAppliance]]


async def _sites(data_dir: Path) -> tuple[LabSite, LabSite]:
    return LabSite.open(data_dir / "sites" / "onprem"), LabSite.open(data_dir / "sites" / "cloud")


async def _qemu_compare(left: Path, right: Path) -> None:
    """qemu-img compare over NBD: our server exports both disks, qemu reads them."""
    async with (
        await LayeredDisk.open(left) as source,
        await LayeredDisk.open(right) as target,
        NbdServer({"source": source.active(), "target": target.active()}) as server,
    ):
        result = await asyncio.to_thread(
            subprocess.run,
            ["qemu-img", "compare", "-f", "raw", "-F", "raw",
             server.url("source"), server.url("target")],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


async def _step_history(harness: Harness, migration_id: str) -> list[str]:
    store = StateStore(connect(harness.redis_url), Keys(harness.prefix))
    try:
        events = await EventLog(store).read(migration_id, count=1000)
    finally:
        await store.close()
    return [e.fields["step"] for e in events if e.kind == "step"]


async def test_a_three_disk_vm_arrives_byte_identical(
    harness: Harness, start_appliance: StartAppliance
) -> None:
    vm = lab_vm(1, disks=3, disk_size=24 * MIB)
    await build_lab(harness.data_dir, [vm])
    running = await start_appliance(harness.settings())
    async with FerryClient(harness.client_settings()) as client:
        follower = await start_migration(client, clone_request(client, [vm.vm_id]))
        (status,) = (await follower.finished(1)).values()
    await running.shutdown()

    assert status.state is MigrationState.COMPLETED, status.error
    assert status.bytes_done == status.bytes_total > 0
    assert {c.name for c in status.checks if c.passed} >= {
        "os_supported", "tools_running", "target_networks", "target_capacity", "credentials",
    }  # fmt: skip
    phases = [s.phase.value for s in follower.history]
    assert phases.index("transfer") < phases.index("verify") < phases.index("create_target")
    for disk in vm.disks:
        source = onprem_disk(harness.data_dir, vm.vm_id, disk.disk_id)
        target = cloud_volume(harness.data_dir, f"{status.migration_id}-{disk.disk_id}")
        assert await disk_digest(source) == await disk_digest(target)
        await _qemu_compare(source, target)
    onprem, cloud = await _sites(harness.data_dir)
    moved = await onprem.get_vm(vm.vm_id)
    assert moved.power_state is PowerState.OFF and moved.resource_pool == "_HDM_MIGRATEPOOL"
    created = await cloud.get_vm(status.migration_id)
    assert created.power_state is PowerState.ON
    assert [n.network for n in created.nics] == ["cloud-app"]
    assert [d.capacity_bytes for d in created.disks] == [d.capacity_bytes for d in vm.disks]
    assert created.cpus == vm.cpus and created.firmware == vm.firmware
    assert await _step_history(harness, status.migration_id) == [
        "preparing", "powering_off", "snapshotting", "transferring", "verifying",
        "creating_target", "powering_on", "finalizing", "completed",
    ]  # fmt: skip


async def _no_cloud_artefacts(data_dir: Path) -> None:
    _, cloud = await _sites(data_dir)
    assert await cloud.list_vms() == []
    volumes = data_dir / "sites" / "cloud" / "volumes"
    assert not volumes.exists() or list(volumes.iterdir()) == []


async def _as_it_was(data_dir: Path, before: object) -> None:
    onprem, _ = await _sites(data_dir)
    vm = await onprem.get_vm(before.vm_id)  # type: ignore[attr-defined]
    assert vm.power_state is before.power_state  # type: ignore[attr-defined]
    assert vm.resource_pool == before.resource_pool  # type: ignore[attr-defined]
    for disk in vm.disks:
        async with await LayeredDisk.open(onprem_disk(data_dir, vm.vm_id, disk.disk_id)) as d:
            assert d.snapshots() == [], "a failed or cancelled migration leaves no snapshot"


async def test_a_dependent_group_fails_together_and_leaves_the_source_as_it_was(
    harness: Harness, start_appliance: StartAppliance
) -> None:
    from messages.common import ToolsStatus

    good = lab_vm(1, disks=1, disk_size=8 * MIB)
    bad = lab_vm(2, disks=2, disk_size=8 * MIB, tools_status=ToolsStatus.NOT_INSTALLED)
    await build_lab(harness.data_dir, [good, bad])
    running = await start_appliance(harness.settings())
    async with FerryClient(harness.client_settings()) as client:
        request = clone_request(client, [good.vm_id, bad.vm_id], groups=[[good.vm_id, bad.vm_id]])
        follower = await start_migration(client, request)
        final = await follower.finished(2)
        by_vm = {s.vm_id: s for s in final.values()}
        assert {s.state for s in final.values()} == {MigrationState.FAILED}
        bad_error, good_error = by_vm[bad.vm_id].error, by_vm[good.vm_id].error
        assert bad_error is not None and good_error is not None
        assert bad_error.code == "precheck_failed"
        assert "tools_running" in bad_error.message
        assert good_error.code == "dependency_failed"
        # The VMs are free again: the good one alone migrates now.
        again = await start_migration(client, clone_request(client, [good.vm_id]))
        (status,) = (await again.finished(1)).values()
        assert status.state is MigrationState.COMPLETED
    await running.shutdown()
    await _as_it_was(harness.data_dir, bad)


async def test_a_dependent_group_cuts_over_together(
    harness: Harness, start_appliance: StartAppliance
) -> None:
    vms = [lab_vm(1, disks=1, disk_size=8 * MIB), lab_vm(2, disks=2, disk_size=8 * MIB)]
    await build_lab(harness.data_dir, vms)
    await start_appliance(harness.settings())
    ids = [vm.vm_id for vm in vms]
    async with FerryClient(harness.client_settings()) as client:
        follower = await start_migration(client, clone_request(client, ids, groups=[ids]))
        final = await follower.finished(2)
    assert {s.state for s in final.values()} == {MigrationState.COMPLETED}
    assert len({s.group_id for s in final.values()}) == 1
    # A finished migration lets go of its disks: they open here while the appliance runs.
    for vm in vms:
        async with await LayeredDisk.open(onprem_disk(harness.data_dir, vm.vm_id, "disk-0")):
            pass
    # No member starts cutting over before every member is verified.
    history = [s.phase.value for s in follower.history]
    last_verify = max(i for i, phase in enumerate(history) if phase == "verify")
    first_create = min(i for i, phase in enumerate(history) if phase == "create_target")
    assert last_verify < first_create


class GatedWan:
    """The data path's WAN link, shut until the test opens it: a migration that reaches its
    transfer waits there, so none finishes (and frees a slot) before the test says so."""

    def __init__(self) -> None:
        self.gate = Gate()

    async def __call__(self, address: NbdAddress) -> NbdAddress:
        await self.gate.passage()
        return address


async def _admission_order(harness: Harness) -> list[str]:
    """Migration ids in the order they were admitted (their step to "preparing"), from the
    global event log: a Redis stream, so its order is the order of the writes."""
    store = StateStore(connect(harness.redis_url), Keys(harness.prefix))
    try:
        events = await EventLog(store).read(count=10_000)
    finally:
        await store.close()
    return [
        e.migration_id
        for e in events
        if e.kind == "step" and e.fields["step"] == "preparing" and e.migration_id
    ]


async def test_ten_requests_with_a_limit_of_eight_queue_in_order(
    harness: Harness, start_appliance: StartAppliance
) -> None:
    vms = [lab_vm(i, disks=1, disk_size=8 * MIB) for i in range(1, 11)]
    await build_lab(harness.data_dir, vms)
    wan = GatedWan()
    await start_appliance(harness.settings(max_concurrent_migrations=8), wan=wan)
    async with FerryClient(harness.client_settings()) as client:
        followers = []
        for vm in vms:  # one request each, in this order
            followers.append(await start_migration(client, clone_request(client, [vm.vm_id])))
        # A second migration of a VM already in flight is refused with a clear code.
        try:
            await client.request(clone_request(client, [vms[0].vm_id]))
        except FerryError as error:
            assert error.code.value == "conflict" and vms[0].vm_id in str(error)
        else:  # pragma: no cover
            raise AssertionError("a VM in flight must not be migrated twice")
        await wan.gate.reached(8)  # the first eight run, held at their transfer
        queued: dict[str, MigrationStatus] = {}
        for follower in followers[8:]:
            queued.update(
                await follower.until(lambda latest: any(s.queue_position for s in latest.values()))
            )
        assert sorted(s.queue_position or 0 for s in queued.values()) == [1, 2]
        assert wan.gate.arrived == 8, "the limit holds: the ninth and tenth wait in line"
        wan.gate.open()
        finals = []
        for follower in followers:
            (status,) = (await follower.finished(1, within_s=180)).values()
            finals.append(status)
    assert [s.state for s in finals] == [MigrationState.COMPLETED] * 10, [s.error for s in finals]
    assert wan.gate.arrived == 10
    assert [s.vm_id for s in finals] == [vm.vm_id for vm in vms]
    assert await _admission_order(harness) == [s.migration_id for s in finals]


async def test_cancel_mid_transfer_restores_the_source_and_removes_cloud_artefacts(
    harness: Harness, start_appliance: StartAppliance
) -> None:
    from messages.commands import CancelRequest, CancelRequestBody, MigrationSelector
    from messages.common import Phase

    vm = lab_vm(1, disks=2, disk_size=48 * MIB)
    await build_lab(harness.data_dir, [vm])
    running = await start_appliance(harness.settings(progress_interval_s=0.5))
    async with FerryClient(harness.client_settings()) as client:
        follower = await start_migration(
            client, clone_request(client, [vm.vm_id], bandwidth_mbps=40)
        )
        await follower.until(
            lambda latest: any(
                s.phase is Phase.TRANSFER and s.bytes_done > 0 for s in latest.values()
            )
        )
        (migration_id,) = follower.latest
        cancel = CancelRequest(
            body=CancelRequestBody(select=MigrationSelector(migration_ids=(migration_id,)))
        )
        answer = await client.request(cancel)
        assert isinstance(answer, SourceCloneResponse)
        assert answer.body.state is MigrationState.CANCELLING
        (status,) = (await follower.finished(1)).values()
        assert status.state is MigrationState.CANCELLED
        assert 0 < max(s.bytes_done for s in follower.history) < status.bytes_total
        # Cancelling a finished migration is a conflict, with a clear code.
        try:
            await client.request(
                CancelRequest(
                    body=CancelRequestBody(select=MigrationSelector(migration_ids=(migration_id,)))
                )
            )
        except FerryError as error:
            assert error.code.value == "conflict"
        else:  # pragma: no cover
            raise AssertionError("cancelling a cancelled migration must be refused")
    await running.shutdown()
    await _as_it_was(harness.data_dir, vm)
    await _no_cloud_artefacts(harness.data_dir)
    store = StateStore(connect(harness.redis_url), Keys(harness.prefix))
    try:
        leftovers = [k async for k in store.redis.scan_iter(match=f"{harness.prefix}:checkpoint:*")]
    finally:
        await store.close()
    assert leftovers == []


class ProxiedWan:
    """The data path's WAN link through a fault-injecting proxy in front of the cloud NBD server."""

    def __init__(self, arm: Callable[[FaultProxy], None]) -> None:
        self._arm = arm
        self.proxy: FaultProxy | None = None

    async def __call__(self, address: NbdAddress) -> NbdAddress:
        assert isinstance(address, TcpAddress)
        if self.proxy is None:
            self.proxy = FaultProxy(address.host, address.port)
            await self.proxy.start()
            self._arm(self.proxy)
        return TcpAddress("127.0.0.1", self.proxy.port)

    async def close(self) -> None:
        if self.proxy is not None:
            await self.proxy.stop()


async def _migrate_over(
    harness: Harness, start_appliance: StartAppliance, wan: ProxiedWan, vm: VmConfig
) -> MigrationStatus:
    await build_lab(harness.data_dir, [vm])
    running = await start_appliance(harness.settings(), wan=wan)
    try:
        async with FerryClient(harness.client_settings()) as client:
            follower = await start_migration(client, clone_request(client, [vm.vm_id]))
            (status,) = (await follower.finished(1)).values()
    finally:
        await running.shutdown()
        await wan.close()
    return status


async def test_dropped_links_are_retried_and_the_copy_is_still_exact(
    harness: Harness, start_appliance: StartAppliance
) -> None:
    vm = lab_vm(1, disks=1, disk_size=32 * MIB)
    wan = ProxiedWan(lambda proxy: proxy.drop_after(5 * MIB))
    status = await _migrate_over(harness, start_appliance, wan, vm)
    assert status.state is MigrationState.COMPLETED, status.error
    assert wan.proxy is not None and wan.proxy.drops >= 1 and wan.proxy.connections >= 2
    source = onprem_disk(harness.data_dir, vm.vm_id, "disk-0")
    target = cloud_volume(harness.data_dir, f"{status.migration_id}-disk-0")
    assert await disk_digest(source) == await disk_digest(target)


async def test_a_link_that_keeps_dropping_fails_the_migration_cleanly(
    harness: Harness, start_appliance: StartAppliance
) -> None:
    vm = lab_vm(1, disks=1, disk_size=16 * MIB)
    wan = ProxiedWan(lambda proxy: proxy.drop_every(200 * 1024))
    status = await _migrate_over(harness, start_appliance, wan, vm)
    assert status.state is MigrationState.FAILED
    assert status.error is not None and status.error.code == "data_path"
    assert "attempts" in status.error.message and "offset" in status.error.message
    await _as_it_was(harness.data_dir, vm)
    await _no_cloud_artefacts(harness.data_dir)


async def test_sigkill_at_five_phases_resumes_each_time_and_runs_nothing_twice(
    harness: Harness, tmp_path: Path
) -> None:
    from messages.common import Phase

    vm = lab_vm(1, disks=2, disk_size=32 * MIB)
    await build_lab(harness.data_dir, [vm])
    log = tmp_path / "appliance.log"
    slow = {"debug_step_delay_s": 1.5, "lease_ttl_s": 2, "progress_interval_s": 0.3}
    appliance = await ApplianceProcess(harness, log, **slow).start()
    kills = []
    try:
        async with FerryClient(harness.client_settings()) as client:
            request = clone_request(client, [vm.vm_id], bandwidth_mbps=60)
            follower = await start_migration(client, request)
            for phase in (Phase.PREPARE, Phase.SNAPSHOT, Phase.TRANSFER, Phase.CREATE_TARGET,
                          Phase.FINALIZE):  # fmt: skip
                if phase is Phase.TRANSFER:
                    await follower.until(
                        lambda latest: any(
                            s.phase is Phase.TRANSFER and s.bytes_done > 0 for s in latest.values()
                        )
                    )
                else:
                    await follower.phase(phase)
                appliance.kill()
                kills.append(phase.value)
                appliance = await ApplianceProcess(harness, log, **slow).start()
            (status,) = (await follower.finished(1, within_s=180)).values()
    finally:
        await appliance.stop()
    assert kills == ["prepare", "snapshot", "transfer", "create_target", "finalize"]
    assert status.state is MigrationState.COMPLETED, status.error
    assert await _step_history(harness, status.migration_id) == [
        "preparing", "powering_off", "snapshotting", "transferring", "verifying",
        "creating_target", "powering_on", "finalizing", "completed",
    ]  # fmt: skip
    for disk in vm.disks:
        source = onprem_disk(harness.data_dir, vm.vm_id, disk.disk_id)
        target = cloud_volume(harness.data_dir, f"{status.migration_id}-{disk.disk_id}")
        assert await disk_digest(source) == await disk_digest(target)
    _, cloud = await _sites(harness.data_dir)
    assert [v.vm_id for v in await cloud.list_vms()] == [status.migration_id]
    # Resumed from its checkpoint, not from the beginning: the transfer log says so.
    assert "resumed=True" in log.read_text()


async def test_two_appliances_one_killed_the_other_takes_over(
    harness: Harness, tmp_path: Path
) -> None:
    from messages.common import Phase

    vms = [lab_vm(1, disks=1, disk_size=32 * MIB), lab_vm(2, disks=1, disk_size=32 * MIB)]
    await build_lab(harness.data_dir, vms)
    common = {"lease_ttl_s": 2, "progress_interval_s": 0.3}
    first = await ApplianceProcess(
        harness, tmp_path / "a.log", appliance_id="ferry-a", **common
    ).start()
    second = await ApplianceProcess(
        harness, tmp_path / "b.log", appliance_id="ferry-b", **common
    ).start()
    processes = {"ferry-a": first, "ferry-b": second}
    store = StateStore(connect(harness.redis_url), Keys(harness.prefix))
    try:
        async with FerryClient(harness.client_settings()) as client:
            request = clone_request(client, [vm.vm_id for vm in vms], bandwidth_mbps=40)
            follower = await start_migration(client, request)
            await follower.until(
                lambda latest: (
                    len(latest) == 2
                    and all(s.phase is Phase.TRANSFER and s.bytes_done > 0 for s in latest.values())
                )
            )
            owners = {}
            for status in follower.latest.values():
                key = store.keys.lease(f"group:{status.group_id}")
                owner = await field_text(store.redis, key, "owner")
                owners[status.migration_id] = owner.split("/")[0]  # "<appliance id>/<process>"
            victim = next(iter(owners.values()))
            processes.pop(victim).kill()
            final = await follower.finished(2, within_s=180)
    finally:
        for process in processes.values():
            await process.stop()
        await store.close()
    assert {s.state for s in final.values()} == {MigrationState.COMPLETED}
    survivor = next(iter(processes))
    for migration_id, owner in owners.items():
        history = await _step_history(harness, migration_id)
        assert history.count("preparing") == 1 and history[-1] == "completed"
        if owner == victim:
            takeover = (tmp_path / ("a.log" if survivor == "ferry-a" else "b.log")).read_text()
            assert "taking over group" in takeover
    for vm in vms:
        status = next(s for s in final.values() if s.vm_id == vm.vm_id)
        source = onprem_disk(harness.data_dir, vm.vm_id, "disk-0")
        target = cloud_volume(harness.data_dir, f"{status.migration_id}-disk-0")
        assert await disk_digest(source) == await disk_digest(target)
