"""Warm migration with an offline bulk transfer, through a LocalStack S3 package.

The appliance exports the migrate-time snapshot as a package (manifest + hashed
chunks) into the bucket, then waits; a BulkMigrationDoneRequest makes it verify
every chunk and write the volume. A tampered chunk and a missing one are named
in the answer's error and the migration waits (it does not fail); once they are
put right, a second BulkMigrationDoneRequest imports only what was wrong, and the
migration reconciles what the guest wrote meanwhile, cuts over and commits.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from appliance.datapath.package import S3Access, load_manifest, open_store, verify_package
from appliance.datapath.package.manifest import object_name
from appliance.orchestrator.states import Step
from appliance.orchestrator.warm_offline import HELD_AFTER
from appliance.state.migrations import MigrationStore
from appliance.storage.hashing import chunk_hash
from clients.client import FerryClient
from messages.commands import (
    BulkMigrationDoneRequest,
    BulkMigrationDoneRequestBody,
    CloneOptions,
    CloneVm,
    MigrationSelector,
    NetworkMapping,
    SourceCloneRequest,
    SourceCloneRequestBody,
    StatusRequestBody,
)
from messages.common import BulkTransferMode, MigrationState, MigrationType, Phase
from messages.events import SourceCloneResponse
from tests.integration.conftest import Harness
from tests.integration.migration_helpers import ApplianceProcess, start_migration
from tests.integration.tbc_helpers import (
    Guest,
    cloud_export,
    commit_request,
    components_up,
    expected_after,
    kill_pids,
    read_onprem,
    state_store,
)
from tests.integration.test_bus import StartAppliance
from tests.integration.test_package import bucket, s3_client
from tests.integration.test_warm import (
    WARM_SETTINGS,
    _held,
    _passes,
    _read_volume,
    _until_record,
    open_gates,
)
from tests.support.lab import MIB, NETWORK_MAP, build_lab, lab_vm

pytestmark = pytest.mark.timeout(300)
__all__ = ["bucket"]  # the fixture


def offline_request(client: FerryClient, vm_id: str, location: str) -> SourceCloneRequest:
    return SourceCloneRequest(
        body=SourceCloneRequestBody(
            vms=(CloneVm(vm_id=vm_id),),
            migration_type=MigrationType.WARM,
            bulk_transfer_mode=BulkTransferMode.OFFLINE,
            package_location=location,
            guest_credentials=client.seal_credentials("tester", "pw-123"),
            network_map=tuple(NetworkMapping(source=s, target=t) for s, t in NETWORK_MAP.items()),
            options=CloneOptions(),
        )
    )


def bulk_done(migration_id: str, location: str) -> BulkMigrationDoneRequest:
    selector = MigrationSelector(migration_ids=(migration_id,))
    body = BulkMigrationDoneRequestBody(select=selector, package_location=location)
    return BulkMigrationDoneRequest(body=body)


async def test_warm_offline_through_an_s3_package_waits_for_a_corrected_import(
    harness: Harness,
    start_appliance: StartAppliance,
    tmp_path: Path,
    bucket: tuple[str, S3Access],
) -> None:
    name, access = bucket
    vm = lab_vm(1, disks=1, disk_size=8 * MIB)
    await build_lab(harness.data_dir, [vm])
    base = await read_onprem(harness.data_dir, vm.vm_id, "disk-0")
    settings = harness.settings(**WARM_SETTINGS, s3_endpoint=harness.endpoint)
    running = await start_appliance(settings)
    async with FerryClient(harness.client_settings()) as client, state_store(harness) as store:
        await components_up(store)
        request = offline_request(client, vm.vm_id, f"s3://{name}/packages")
        follower = await start_migration(client, request)
        (migration_id,) = follower.latest
        location = f"s3://{name}/packages/{migration_id}"

        # Exported, then waiting (and saying so) while the guest runs over the cache.
        waiting = await _until_record(
            store, migration_id, "exported", lambda r: r.step is Step.AWAITING_BULK
        )
        assert len(str(waiting.extra["package_sha256"])) == 64
        status = await follower.phase(Phase.AWAIT_BULK_DONE)
        assert status.state is MigrationState.RUNNING
        address, export = await cloud_export(harness.data_dir, migration_id, "disk-0")
        guest = await Guest.start(address, export, tmp_path / "guest.log", seed=41)
        await guest.wait_writes(40, within_s=30)

        # Damage the shipped package: one chunk tampered, one missing.
        async with s3_client(access) as s3:
            listed = await s3.list_objects_v2(Bucket=name, Prefix=f"packages/{migration_id}/")
            chunks = sorted(o["Key"] for o in listed["Contents"] if o["Key"].endswith(".chunk"))
            assert len(chunks) >= 2
            tampered, missing = chunks[0], chunks[-1]
            originals = {}
            for key in (tampered, missing):
                got = await s3.get_object(Bucket=name, Key=key)
                originals[key] = await got["Body"].read()
            await s3.put_object(Bucket=name, Key=tampered, Body=b"\xff" + originals[tampered][1:])
            await s3.delete_object(Bucket=name, Key=missing)

            answer = await client.request(bulk_done(migration_id, location), timeout_s=120)
            assert isinstance(answer, SourceCloneResponse)
            assert answer.body.state is MigrationState.RUNNING
            assert answer.body.phase is Phase.AWAIT_BULK_DONE
            assert answer.body.error is not None
            assert answer.body.error.code == "package_needs_correction"
            for key in (tampered, missing):
                assert key.split("/", 2)[2] in answer.body.error.message
            still = await _until_record(
                store, migration_id, "waiting", lambda r: r.step is Step.AWAITING_BULK
            )
            assert still.error_code == "package_needs_correction"

            # Put right, asked again: imported, verified, and the migration goes on.
            for key, data in originals.items():
                await s3.put_object(Bucket=name, Key=key, Body=data)
        answer = await client.request(bulk_done(migration_id, location), timeout_s=120)
        assert isinstance(answer, SourceCloneResponse)
        assert answer.body.error is None
        await _until_record(store, migration_id, "reconciling", lambda r: _passes(r) >= 2)

        await guest.halt()
        await open_gates(store, migration_id)
        cut = await _until_record(
            store, migration_id, "cut over", lambda r: r.step is Step.CUT_OVER
        )
        await client.request(commit_request([migration_id]))
        (done,) = (await follower.finished(1)).values()
        assert done.state is MigrationState.COMPLETED
    await running.shutdown()

    expected = await expected_after(base, tmp_path / "guest.log")
    assert expected != base
    assert cut.disks[0].volume_id == f"{vm.name}_ARM"
    assert await _read_volume(harness.data_dir, f"{vm.name}_ARM") == expected


async def test_sigkill_while_waiting_for_the_package_resumes_waiting_from_a_directory(
    harness: Harness, tmp_path: Path
) -> None:
    """Offline into a directory package: the appliance dies while the migration waits for
    the import; the next one waits on, imports on BulkMigrationDoneRequest, and the
    migration cuts over onto a volume equal to the snapshot (no guest wrote)."""
    vm = lab_vm(1, disks=2, disk_size=4 * MIB)
    await build_lab(harness.data_dir, [vm])
    bases = {d.disk_id: await read_onprem(harness.data_dir, vm.vm_id, d.disk_id) for d in vm.disks}
    overrides = {**WARM_SETTINGS, "lease_ttl_s": 3.0}
    appliances = [
        ApplianceProcess(harness, tmp_path / f"appliance-{n}.log", **overrides) for n in range(2)
    ]
    orphans: list[int] = []
    packages = tmp_path / "packages"
    try:
        await appliances[0].start()
        async with FerryClient(harness.client_settings()) as client, state_store(harness) as store:
            orphans += (await components_up(store)).values()
            request = offline_request(client, vm.vm_id, str(packages))
            follower = await start_migration(client, request)
            (migration_id,) = follower.latest
            waiting = await _until_record(
                store, migration_id, "exported", lambda r: r.step is Step.AWAITING_BULK
            )
            assert (packages / migration_id / "manifest.json").is_file()
            appliances[0].kill()
            await appliances[1].start()
            answer = await client.request(
                bulk_done(migration_id, str(packages / migration_id)), timeout_s=120
            )
            assert isinstance(answer, SourceCloneResponse) and answer.body.error is None
            await open_gates(store, migration_id)
            cut = await _until_record(
                store, migration_id, "cut over", lambda r: r.step is Step.CUT_OVER
            )
            assert cut.extra["package_sha256"] == waiting.extra["package_sha256"]
            # Its volumes, named after the VM; the finished figures (no guest wrote: the
            # passes found nothing, the package's bytes are all there is), not zeros.
            answer = await client.status(StatusRequestBody(migration_ids=(migration_id,)))
            (shown,) = answer.body.migrations
            assert shown.volumes == (f"{vm.name}_ARM", f"{vm.name}_ARM_2")
            assert shown.progress_percent == 100.0
            assert shown.bytes_done == shown.bytes_total == sum(d.capacity_bytes for d in vm.disks)
        await appliances[1].stop()
    finally:
        for appliance in appliances:
            appliance.kill()
        kill_pids(orphans, harness.data_dir)
    volumes = {"disk-0": f"{vm.name}_ARM", "disk-1": f"{vm.name}_ARM_2"}
    assert {disk.disk_id: disk.volume_id for disk in cut.disks} == volumes
    for disk_id, volume in volumes.items():
        assert await _read_volume(harness.data_dir, volume) == bases[disk_id]


async def test_sigkill_while_exporting_the_package_resumes_it_whole(
    harness: Harness, tmp_path: Path
) -> None:
    """The appliance dies in the middle of the export (held with its first chunks stored);
    while it is down one stored chunk is damaged (a torn write on a disk without atomic
    renames). The next one resumes the export: the chunks already there and right are not
    written again, the damaged one is, and the package verifies whole, with exactly the
    manifest's objects (no duplicate, no temporary, nothing corrupt); imported, it gives
    the volumes the snapshot's bytes."""
    vm = lab_vm(1, disks=2, disk_size=16 * MIB)  # a dozen data chunks or so
    await build_lab(harness.data_dir, [vm])
    bases = {d.disk_id: await read_onprem(harness.data_dir, vm.vm_id, d.disk_id) for d in vm.disks}
    overrides = {**WARM_SETTINGS, "lease_ttl_s": 3.0, "debug_warm_holds": "export"}
    logs = [tmp_path / f"appliance-{n}.log" for n in range(2)]
    appliances = [ApplianceProcess(harness, log, **overrides) for log in logs]
    orphans: list[int] = []
    packages = tmp_path / "packages"
    try:
        await appliances[0].start()
        async with FerryClient(harness.client_settings()) as client, state_store(harness) as store:
            orphans += (await components_up(store)).values()
            follower = await start_migration(
                client, offline_request(client, vm.vm_id, str(packages))
            )
            (migration_id,) = follower.latest
            package = packages / migration_id
            await _held(store, migration_id, "export", 1)
            held = await _until_record(store, migration_id, "exporting", lambda r: True)
            assert held.step is Step.BULK_COPYING and "package_sha256" not in held.extra
            stored = sorted(package.rglob("*.chunk"))
            assert len(stored) == HELD_AFTER and not (package / "manifest.json").exists()
            appliances[0].kill()
            damaged = stored[0]
            damaged.write_bytes(damaged.read_bytes()[: MIB // 2])
            # And the temporary a write cut short by the kill would leave (half a chunk).
            later = next(n for n in _chunk_names(bases) if not (package / n).exists())
            torn = package / later
            torn.parent.mkdir(parents=True, exist_ok=True)
            torn.with_name(f".{torn.name}.tmp").write_bytes(b"\x01" * (MIB // 2))

            await appliances[1].start()
            await _held(store, migration_id, "export", 2)
            await MigrationStore(store).ask(migration_id, "export_go", "1")
            waiting = await _until_record(
                store, migration_id, "exported", lambda r: r.step is Step.AWAITING_BULK
            )
            digest = str(waiting.extra["package_sha256"])
            async with open_store(str(package)) as opened:
                report = await verify_package(opened, digest)
                manifest, _ = await load_manifest(opened, digest)
            assert report.ok and report.defects == () and report.unknown_objects == ()
            objects = {c.object for d in manifest.disks for c in d.chunks}
            on_disk = {p.relative_to(package).as_posix() for p in package.rglob("*") if p.is_file()}
            assert on_disk == objects | {"manifest.json"}  # no duplicate, no temporary
            assert report.chunks_checked == len(objects) > HELD_AFTER

            answer = await client.request(bulk_done(migration_id, str(package)), timeout_s=120)
            assert isinstance(answer, SourceCloneResponse) and answer.body.error is None
            await open_gates(store, migration_id)
            cut = await _until_record(
                store, migration_id, "cut over", lambda r: r.step is Step.CUT_OVER
            )
        await appliances[1].stop()
    finally:
        for appliance in appliances:
            appliance.kill()
        kill_pids(orphans, harness.data_dir)
    # The resumed export kept the chunk it found right and rewrote the damaged one.
    exported = next(
        line
        for line in logs[1].read_text().splitlines()
        if "package exported" in line and "chunks_present" in line
    )
    assert re.search(r"chunks_present=1\b", exported), exported
    assert re.search(r"chunks_repaired=1\b", exported), exported
    for disk in cut.disks:
        assert await _read_volume(harness.data_dir, disk.volume_id) == bases[disk.disk_id]


def _chunk_names(bases: dict[str, bytes]) -> list[str]:
    """Every data chunk's object name, as the export names them (1 MiB chunks)."""
    names = []
    for disk_id, image in bases.items():
        for offset in range(0, len(image), MIB):
            data = image[offset : offset + MIB]
            if any(data):
                names.append(object_name(disk_id, offset, chunk_hash(data).hex()))
    return names
