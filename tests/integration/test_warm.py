"""Warm migration over SQS, with the real cache and I/O manager processes.

The cloud VM's guest (the workload generator) writes to the cache's export
while the snapshot is bulk-copied into the cloud volume and while reconcile
passes run; after the cutover the VM runs on its volume, which equals the
replay of the guest's whole write log; a CommitRequest cleans up, and a
migrate back is refused afterwards.

Gates the test holds: a policy bandwidth cap keeps the bulk copy going until
the guest has written (then lifted), and ``debug_warm_cutover_gate`` keeps
the migration reconciling until the guest has stopped (the lab's cloud VM has
no guest of its own to stop at power-off), then the ask ``cutover`` lets it go.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from appliance.components.heartbeat import ComponentHealth
from appliance.orchestrator import tags
from appliance.orchestrator.record import MigrationRecord, load
from appliance.orchestrator.states import Step
from appliance.sites.lab.site import LabSite
from appliance.state.events import EventLog
from appliance.state.migrations import MigrationStore
from appliance.state.store import StateStore
from clients.client import FerryClient, FerryError
from messages.commands import (
    CloneOptions,
    CloneVm,
    NetworkMapping,
    SetPolicyRequest,
    SetPolicyRequestBody,
    SourceCloneRequest,
    SourceCloneRequestBody,
    StatusRequestBody,
)
from messages.common import MigrationState, MigrationType, Phase, PowerState
from messages.errors import ErrorCode
from messages.events import MigrationStatus
from tests.integration.conftest import Harness
from tests.integration.migration_helpers import ApplianceProcess, Follower, start_migration
from tests.integration.tbc_helpers import (
    CACHE,
    TBC_SETTINGS,
    Guest,
    cloud_export,
    commit_request,
    committed_at_least,
    components_up,
    expected_after,
    kill_pids,
    migrate_back,
    read_onprem,
    state_store,
    sync,
    tbc_request,
)
from tests.integration.test_bus import StartAppliance
from tests.support.lab import MIB, NETWORK_MAP, build_lab, lab_vm
from tests.support.records import until_record

pytestmark = pytest.mark.timeout(300)

WARM_SETTINGS: dict[str, object] = {
    **TBC_SETTINGS,
    "debug_warm_cutover_gate": True,
    "warm_reconcile_threshold_bytes": 4 * MIB,
    "progress_interval_s": 0.3,
}


def warm_request(client: FerryClient, vm_id: str) -> SourceCloneRequest:
    return SourceCloneRequest(
        body=SourceCloneRequestBody(
            vms=(CloneVm(vm_id=vm_id),),
            migration_type=MigrationType.WARM,
            guest_credentials=client.seal_credentials("tester", "pw-123"),
            network_map=tuple(NetworkMapping(source=s, target=t) for s, t in NETWORK_MAP.items()),
            options=CloneOptions(),
        )
    )


async def _record(store: StateStore, migration_id: str) -> MigrationRecord:
    stored = await MigrationStore(store).get(migration_id)
    assert stored is not None
    return load(stored.record)


async def _until_record(
    store: StateStore, migration_id: str, done: str, check: object, within_s: float = 120
) -> MigrationRecord:
    """Until the record satisfies ``check`` (a bounded watch on the persisted record)."""
    assert callable(check)

    def reached(record: MigrationRecord) -> bool:
        if check(record):
            return True
        assert record.step not in (Step.FAILED, Step.ROLLING_BACK), (done, record)
        return False

    return await until_record(store, migration_id, reached, within_s)


async def open_gates(store: StateStore, migration_id: str) -> None:
    """The guest has stopped: the cutover may begin, and go on past the power-off."""
    for gate in ("cutover", "cutover_off"):
        await MigrationStore(store).ask(migration_id, gate, "1")


def _passes(record: MigrationRecord) -> int:
    return int((record.extra.get("reconcile") or {}).get("passes", 0))


async def _cap(client: FerryClient, mbps: float) -> None:
    policy = SetPolicyRequestBody(cluster="cluster-a", bandwidth_cap_mbps=mbps)
    await client.request(SetPolicyRequest(body=policy))


async def _cut_over(follower: Follower) -> None:
    await follower.until(
        lambda latest: all(s.phase is Phase.IN_CLOUD for s in latest.values()), within_s=120
    )


async def _read_volume(data_dir: Path, volume_id: str) -> bytes:
    cloud = LabSite.open(data_dir / "sites" / "cloud")
    try:
        volume = await cloud.open_volume(volume_id)
        return await volume.read(0, volume.size)
    finally:
        await cloud.close()


async def test_warm_online_copies_reconciles_while_the_guest_writes_cuts_over_and_commits(
    harness: Harness, start_appliance: StartAppliance, tmp_path: Path
) -> None:
    vm = lab_vm(1, disks=1, disk_size=8 * MIB)
    await build_lab(harness.data_dir, [vm])
    base = await read_onprem(harness.data_dir, vm.vm_id, "disk-0")
    running = await start_appliance(harness.settings(**WARM_SETTINGS))
    async with FerryClient(harness.client_settings()) as client, state_store(harness) as store:
        await components_up(store)
        await _cap(client, 0.5)  # the bulk copy crawls until the guest has written
        follower = await start_migration(client, warm_request(client, vm.vm_id))
        (migration_id,) = follower.latest

        # Bulk copy: the guest writes over the cache while the snapshot is copied.
        copying = await _until_record(
            store,
            migration_id,
            "bulk copy under way",
            lambda r: r.step is Step.BULK_COPYING and 0 < r.bytes_done < r.bytes_total,
        )
        address, export = await cloud_export(harness.data_dir, migration_id, "disk-0")
        guest = await Guest.start(address, export, tmp_path / "guest.log", seed=23)
        await guest.wait_writes(40, within_s=30)
        still = await _record(store, migration_id)
        assert still.step is Step.BULK_COPYING and still.bytes_done < still.bytes_total
        # Its progress, as cold's: percent, bytes, rate, ETA.
        latest = await follower.until(
            lambda latest: (
                latest[migration_id].phase is Phase.TRANSFER
                and latest[migration_id].rate_bytes_per_s > 0
            )
        )
        status = latest[migration_id]
        assert status.bytes_total == copying.bytes_total
        assert 0 < status.progress_percent < 100 and status.eta_seconds is not None
        await _cap(client, 10_000.0)

        # Reconcile: passes go on while the guest writes (the gate holds the cutover).
        bulk = await _until_record(store, migration_id, "reconciling", _reconciling)
        bulk_bytes = int(bulk.extra["reconcile"]["bulk_bytes"])
        assert bulk_bytes == copying.bytes_total  # kept for the finished figures
        reconciling = await _until_record(
            store, migration_id, "two passes", lambda r: _passes(r) >= 2
        )
        assert reconciling.step is Step.RECONCILING
        # Its progress, pass by pass, as cold's: the pass's bytes of what it found, rate, ETA.
        await follower.until(lambda _: _a_pass_shown(follower.history) is not None, within_s=60)
        shown_pass = _a_pass_shown(follower.history)
        assert shown_pass is not None and shown_pass.reconcile_pass is not None
        assert shown_pass.progress_percent == 100.0 and shown_pass.eta_seconds == 0.0
        assert 0 < shown_pass.bytes_done == shown_pass.bytes_total
        assert shown_pass.rate_bytes_per_s > 0
        written = await guest.writes()
        await guest.wait_writes(written + 20, within_s=30)
        await _until_record(
            store, migration_id, "a pass after", lambda r: _passes(r) >= _passes(reconciling) + 1
        )

        # Cutover: the guest stops (its VM powers off), then the gate opens.
        await guest.halt()
        await open_gates(store, migration_id)
        await _cut_over(follower)
        record = await _record(store, migration_id)
        assert record.step is Step.CUT_OVER
        assert float(record.extra["cutover_seconds"]) < 30
        # Clients see it too (ferry migrations prints it).
        answer = await client.status(StatusRequestBody(migration_ids=(migration_id,)))
        (shown,) = answer.body.migrations
        assert shown.cutover_s == float(record.extra["cutover_seconds"])
        volume_id = record.disks[0].volume_id
        assert volume_id == f"{vm.name}_ARM"  # named after the VM, as HDM names it
        assert shown.volumes == (volume_id,)
        # The finished figures, not zeros: the bulk copy's bytes and every pass's.
        copied = int(record.extra["reconcile"]["copied_bytes"])
        assert copied > 0
        assert shown.progress_percent == 100.0
        assert shown.bytes_done == shown.bytes_total == bulk_bytes + copied
        assert shown.reconcile_pass is not None and shown.reconcile_pass >= 3
        cloud = LabSite.open(harness.data_dir / "sites" / "cloud")
        cloud_vm = await cloud.get_vm(migration_id)
        await cloud.close()
        assert cloud_vm.power_state is PowerState.ON
        assert [(d.volume_id, d.nbd_export) for d in cloud_vm.disks] == [(volume_id, None)]

        # No way back, no sync: it runs on its volume.
        for refused in (migrate_back([migration_id]), sync([migration_id])):
            with pytest.raises(FerryError) as error:
                await client.request(refused)
            assert error.value.code is ErrorCode.CUT_OVER

        # Commit: the cache and the I/O manager let go; the snapshot goes.
        await client.request(commit_request([migration_id]))
        (done,) = (await follower.finished(1)).values()
        assert done.state is MigrationState.COMPLETED
        disk = f"{migration_id}-disk-0"
        cache = await ComponentHealth(store, 120).wait_until(
            CACHE, lambda r: disk not in r.figures.get("exports", []), 30
        )
        assert disk not in cache.figures.get("exports", [])
        cache_dir = harness.data_dir / "components" / "cache" / "cache-1" / "disks"
        assert not (cache_dir / migration_id / disk).exists()  # removed, as HDM cleans up
        with pytest.raises(FerryError) as after:
            await client.request(migrate_back([migration_id]))
        assert after.value.code is ErrorCode.CUT_OVER
    await running.shutdown()

    onprem = LabSite.open(harness.data_dir / "sites" / "onprem")
    parked = await onprem.get_vm(vm.vm_id)
    assert parked.resource_pool == "_HDM_MIGRATEPOOL" and parked.power_state is PowerState.OFF
    assert await onprem.vm_snapshot_names(vm.vm_id) == []
    await onprem.close()
    expected = await expected_after(base, tmp_path / "guest.log")
    assert expected != base
    image = await _read_volume(harness.data_dir, volume_id)
    assert image == expected
    (tmp_path / "volume.raw").write_bytes(image)
    (tmp_path / "expected.raw").write_bytes(expected)
    code, output = await qemu_img_compare(tmp_path / "volume.raw", tmp_path / "expected.raw")
    assert code == 0, output


def _reconciling(record: MigrationRecord) -> bool:
    return record.step is Step.RECONCILING and "bulk_bytes" in record.extra.get("reconcile", {})


def _a_pass_shown(history: list[MigrationStatus]) -> MigrationStatus | None:
    """A status published at the end of a reconcile pass that copied something."""
    return next(
        (
            s
            for s in history
            if s.reconcile_pass is not None
            and s.phase is Phase.TRANSFER
            and s.bytes_total > 0
            and s.bytes_done == s.bytes_total
        ),
        None,
    )


async def qemu_img_compare(left: Path, right: Path) -> tuple[int, str]:
    """``qemu-img compare``, an independent peer: 0 when the images are byte-equal."""
    process = await asyncio.create_subprocess_exec(
        *("qemu-img", "compare", "-f", "raw", "-F", "raw", str(left), str(right)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, output.decode()


@pytest.mark.parametrize("kill_in", [Step.BULK_COPYING, Step.RECONCILING, Step.CUTTING_OVER])
async def test_sigkill_during_bulk_copy_reconcile_or_cutover_resumes_losing_nothing(
    harness: Harness, tmp_path: Path, kill_in: Step
) -> None:
    """The appliance dies while copying the snapshot (the copy resumes from its
    checkpoints), while reconciling (the passes go on from the persisted number), or in
    the cutover with the cloud VM off (the next one runs the cutover again from the
    top); the components keep serving the guest meanwhile; the volume ends equal to the
    replay."""
    vm = lab_vm(1, disks=1, disk_size=8 * MIB)
    await build_lab(harness.data_dir, [vm])
    base = await read_onprem(harness.data_dir, vm.vm_id, "disk-0")
    overrides = {**WARM_SETTINGS, "lease_ttl_s": 3.0}
    logs = [tmp_path / f"appliance-{n}.log" for n in range(2)]
    appliances = [ApplianceProcess(harness, log, **overrides) for log in logs]
    orphans: list[int] = []
    try:
        await appliances[0].start()
        async with FerryClient(harness.client_settings()) as client, state_store(harness) as store:
            orphans += (await components_up(store)).values()
            await _cap(client, 2.0)  # 8 MiB in about 30 s: killed with some chunks copied
            follower = await start_migration(client, warm_request(client, vm.vm_id))
            (migration_id,) = follower.latest
            await _until_record(
                store,
                migration_id,
                "bulk copy under way",
                lambda r: r.step is Step.BULK_COPYING and r.bytes_done >= 2 * MIB,
            )
            address, export = await cloud_export(harness.data_dir, migration_id, "disk-0")
            guest = await Guest.start(address, export, tmp_path / "guest.log", seed=31)
            await guest.wait_writes(40, within_s=30)
            if kill_in is Step.BULK_COPYING:
                await _kill_and_restart(appliances, guest)
                await _cap(client, 10_000.0)
                await _until_record(store, migration_id, "passes", lambda r: _passes(r) >= 2)
                await guest.halt()
                await open_gates(store, migration_id)
            elif kill_in is Step.RECONCILING:
                await _cap(client, 10_000.0)
                killed = await _until_record(
                    store, migration_id, "two passes", lambda r: _passes(r) >= 2
                )
                await _kill_and_restart(appliances, guest)
                await _until_record(
                    store, migration_id, "passes go on", lambda r: _passes(r) >= _passes(killed) + 2
                )
                await guest.halt()
                await open_gates(store, migration_id)
            else:  # held in CUTTING_OVER with its cloud VM off
                await _cap(client, 10_000.0)
                await _until_record(store, migration_id, "passes", lambda r: _passes(r) >= 2)
                await guest.halt()
                await MigrationStore(store).ask(migration_id, "cutover", "1")
                await _until_record(
                    store, migration_id, "cutting over", lambda r: r.step is Step.CUTTING_OVER
                )
                await _until_powered_off(harness.data_dir, migration_id)
                appliances[0].kill()
                await appliances[1].start()
                await open_gates(store, migration_id)
            cut = await _until_record(
                store, migration_id, "cut over", lambda r: r.step is Step.CUT_OVER
            )
            await client.request(commit_request([migration_id]))
            await _until_record(
                store, migration_id, "committed", lambda r: r.step is Step.COMPLETED
            )
        await appliances[1].stop()
    finally:
        for appliance in appliances:
            appliance.kill()
        kill_pids(orphans, harness.data_dir)
    if kill_in is Step.BULK_COPYING:
        assert "resumed=True" in logs[1].read_text()  # not copied again from the start
    expected = await expected_after(base, tmp_path / "guest.log")
    assert expected != base
    assert await _read_volume(harness.data_dir, cut.disks[0].volume_id) == expected


async def _kill_and_restart(appliances: list[ApplianceProcess], guest: Guest) -> None:
    """The first appliance dies; the guest goes on writing meanwhile; the next one starts."""
    appliances[0].kill()
    written = await guest.writes()
    await guest.wait_writes(written + 30, within_s=30)  # served while it is down
    await appliances[1].start()


async def _until_powered_off(data_dir: Path, vm_id: str, within_s: float = 60) -> None:
    async with asyncio.timeout(within_s):
        while True:
            cloud = LabSite.open(data_dir / "sites" / "cloud")
            try:
                if (await cloud.get_vm(vm_id)).power_state is PowerState.OFF:
                    return
            finally:
                await cloud.close()
            await asyncio.sleep(0.1)


async def test_a_tbc_vm_committed_while_resting_goes_on_as_warm_and_cuts_over(
    harness: Harness, start_appliance: StartAppliance, tmp_path: Path
) -> None:
    """CommitRequest on a tbc VM running in the cloud: it becomes a warm migration from
    there (bulk copy, reconcile while the guest writes, cutover) and, the commit being
    asked already, cleans up once cut over; no way back once asked."""
    vm = lab_vm(1, disks=1, disk_size=8 * MIB)
    await build_lab(harness.data_dir, [vm])
    base = await read_onprem(harness.data_dir, vm.vm_id, "disk-0")
    running = await start_appliance(harness.settings(**WARM_SETTINGS))
    async with FerryClient(harness.client_settings()) as client, state_store(harness) as store:
        await components_up(store)
        policy = SetPolicyRequestBody(cluster="cluster-a", rto_rpo_interval_s=10)
        await client.request(SetPolicyRequest(body=policy))
        follower = await start_migration(client, tbc_request(client, [vm.vm_id]))
        (migration_id,) = follower.latest
        await _until_record(
            store, migration_id, "in the cloud", lambda r: r.step is Step.RUNNING_IN_CLOUD
        )
        address, export = await cloud_export(harness.data_dir, migration_id, "disk-0")
        guest = await Guest.start(address, export, tmp_path / "guest.log", seed=53)
        await committed_at_least(store, f"{migration_id}-disk-0", 1, within_s=60)

        await client.request(commit_request([migration_id]))
        with pytest.raises(FerryError) as back:
            await client.request(migrate_back([migration_id]))
        assert back.value.code is ErrorCode.CUT_OVER
        warm = await _until_record(store, migration_id, "reconciling", lambda r: _passes(r) >= 2)
        assert warm.migration_type is MigrationType.WARM
        written = await guest.writes()
        await guest.wait_writes(written + 20, within_s=30)
        await guest.halt()
        await open_gates(store, migration_id)
        (done,) = (await follower.finished(1, within_s=180)).values()
        assert done.state is MigrationState.COMPLETED
        record = await _record(store, migration_id)
        assert record.extra.get("disks_swapped") is True
    await running.shutdown()

    onprem = LabSite.open(harness.data_dir / "sites" / "onprem")
    assert await onprem.vm_snapshot_names(vm.vm_id) == []
    await onprem.close()
    expected = await expected_after(base, tmp_path / "guest.log")
    assert expected != base
    assert await _read_volume(harness.data_dir, record.disks[0].volume_id) == expected


async def _held(store: StateStore, migration_id: str, point: str, times: int) -> None:
    """Until the run has reached the hold ``point`` ``times`` times (its event log says)."""
    events = EventLog(store)
    async with asyncio.timeout(120):
        while True:
            found = await events.read(migration_id, count=1000)
            if sum(e.kind == "held" and e.fields.get("point") == point for e in found) >= times:
                return
            await asyncio.sleep(0.1)


async def test_sigkill_while_committing_resumes_and_cleans_up_once(
    harness: Harness, tmp_path: Path
) -> None:
    """The appliance dies in COMMITTING, held after the cache and the I/O manager let go of
    the disks and before the migrate-time snapshot goes; the next one runs the commit again
    from the top: the closes are answered as done (the cache removed each disk once), the
    snapshot, the checkpoints and the tags go, and the VM runs on, on its volumes."""
    vm = lab_vm(1, disks=2, disk_size=8 * MIB)
    await build_lab(harness.data_dir, [vm])
    bases = {d.disk_id: await read_onprem(harness.data_dir, vm.vm_id, d.disk_id) for d in vm.disks}
    overrides = {**WARM_SETTINGS, "lease_ttl_s": 3.0, "debug_warm_holds": "commit"}
    logs = [tmp_path / f"appliance-{n}.log" for n in range(3)]
    appliances = [ApplianceProcess(harness, log, **overrides) for log in logs]
    orphans: list[int] = []
    cache_dir = harness.data_dir / "components" / "cache" / "cache-1" / "disks"
    try:
        await appliances[0].start()
        async with FerryClient(harness.client_settings()) as client, state_store(harness) as store:
            orphans += (await components_up(store)).values()
            follower = await start_migration(client, warm_request(client, vm.vm_id))
            (migration_id,) = follower.latest
            disks = [f"{migration_id}-{d.disk_id}" for d in vm.disks]
            await open_gates(store, migration_id)
            await _until_record(store, migration_id, "cut over", lambda r: r.step is Step.CUT_OVER)
            assert all((cache_dir / migration_id / disk).is_dir() for disk in disks)
            await client.request(commit_request([migration_id]))

            # Held in COMMITTING: the cache disks are gone, the snapshot is still there.
            await _held(store, migration_id, "commit", 1)
            held = await _record(store, migration_id)
            assert held.step is Step.COMMITTING
            assert not any((cache_dir / migration_id / disk).exists() for disk in disks)
            assert await _snapshots(harness.data_dir, vm.vm_id) != []
            appliances[0].kill()
            await appliances[1].start()
            await _held(store, migration_id, "commit", 2)  # the commit ran again from the top
            # A clean stop there too: it leaves the components serving (a warm VM in
            # COMMITTING is on them), and the next appliance goes on.
            assert await appliances[1].stop() == 0
            await appliances[2].start()
            await _held(store, migration_id, "commit", 3)
            await MigrationStore(store).ask(migration_id, "commit_go", "1")
            (done,) = (await follower.finished(1, within_s=120)).values()
            assert done.state is MigrationState.COMPLETED
            cache = await ComponentHealth(store, 120).wait_until(
                CACHE, lambda r: not set(disks) & set(r.figures.get("exports", [])), 30
            )
            assert not set(disks) & set(cache.figures.get("exports", []))
            record = await _record(store, migration_id)
        await appliances[2].stop()
    finally:
        for appliance in appliances:
            appliance.kill()
        kill_pids(orphans, harness.data_dir)
    assert record.step is Step.COMPLETED and record.error_code is None
    assert await _snapshots(harness.data_dir, vm.vm_id) == []
    # Each cache disk removed exactly once, though the commit ran twice.
    cache_log = (harness.data_dir / "logs" / "cache-cache-1.log").read_text()
    for disk in disks:
        removed = [
            line
            for line in cache_log.splitlines()
            if "cache disk discarded" in line and disk in line
        ]
        assert len(removed) == 1, removed
    onprem = LabSite.open(harness.data_dir / "sites" / "onprem")
    parked = await onprem.get_vm(vm.vm_id)
    await onprem.close()
    assert parked.resource_pool == "_HDM_MIGRATEPOOL" and parked.power_state is PowerState.OFF
    assert tags.pending_migration(parked) is None
    cloud = LabSite.open(harness.data_dir / "sites" / "cloud")
    cloud_vm = await cloud.get_vm(migration_id)
    await cloud.close()
    assert cloud_vm.power_state is PowerState.ON
    assert [d.volume_id for d in cloud_vm.disks] == [f"{vm.name}_ARM", f"{vm.name}_ARM_2"]
    for plan in record.disks:
        assert await _read_volume(harness.data_dir, plan.volume_id) == bases[plan.disk_id]


async def _snapshots(data_dir: Path, vm_id: str) -> list[str]:
    onprem = LabSite.open(data_dir / "sites" / "onprem")
    try:
        return await onprem.vm_snapshot_names(vm_id)
    finally:
        await onprem.close()


async def test_a_vm_migrated_back_migrates_again_as_warm_into_its_arm_volume(
    harness: Harness, start_appliance: StartAppliance
) -> None:
    """A tbc migration goes to the cloud and back; the same VM then migrates warm. Its
    volume has the same name (<vm>_ARM: the tbc made none), while the components know each
    migration's disk by its own id, so nothing the first left in the cache is met again;
    it cuts over onto a volume equal to the on-prem disk, and commits."""
    vm = lab_vm(1, disks=1, disk_size=8 * MIB)
    await build_lab(harness.data_dir, [vm])
    running = await start_appliance(harness.settings(**WARM_SETTINGS))
    cache_dir = harness.data_dir / "components" / "cache" / "cache-1" / "disks"
    async with FerryClient(harness.client_settings()) as client, state_store(harness) as store:
        await components_up(store)
        first = await start_migration(client, tbc_request(client, [vm.vm_id]))
        (tbc_id,) = first.latest
        await _until_record(
            store, tbc_id, "in the cloud", lambda r: r.step is Step.RUNNING_IN_CLOUD
        )
        await client.request(migrate_back([tbc_id], power_on=True))
        await _until_record(store, tbc_id, "back", lambda r: r.step is Step.MIGRATED_BACK)
        base = await read_onprem(harness.data_dir, vm.vm_id, "disk-0")

        second = await start_migration(client, warm_request(client, vm.vm_id))
        (warm_id,) = second.latest
        assert warm_id != tbc_id
        await open_gates(store, warm_id)
        cut = await _until_record(store, warm_id, "cut over", lambda r: r.step is Step.CUT_OVER)
        tbc = await _record(store, tbc_id)
        assert tbc.disks[0].volume_id == cut.disks[0].volume_id == f"{vm.name}_ARM"
        assert tbc.disks[0].served_as == f"{tbc_id}-disk-0"
        assert cut.disks[0].served_as == f"{warm_id}-disk-0"
        await client.request(commit_request([warm_id]))
        (done,) = (await second.finished(1)).values()
        assert done.state is MigrationState.COMPLETED
        assert not (cache_dir / tbc_id).joinpath(f"{tbc_id}-disk-0").exists()
        assert not (cache_dir / warm_id).joinpath(f"{warm_id}-disk-0").exists()
    await running.shutdown()
    assert await _read_volume(harness.data_dir, f"{vm.name}_ARM") == base
