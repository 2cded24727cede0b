"""The cloud site's disk fills up mid-transfer: a clean failure that says so, and a resume.

The cloud site's data directory is a small tmpfs (8 MiB) with ballast in it,
so the copy of a VM's 6 MiB runs out of space half-way. The migration must
fail with ``out_of_space`` naming the volume, the on-prem VM must be as it
was, no cloud VM may exist, and the copied data and its checkpoints must be
kept. After the ballast is removed (space freed) and the VM wrote more data,
a SyncRequest resumes the migration: it skips the chunks still good at the
target, re-sends what changed, and ends with a byte-identical volume.
"""

from __future__ import annotations

import random
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from appliance.sites.lab.site import LabSite
from appliance.state.events import EventLog
from appliance.state.keys import Keys
from appliance.state.store import StateStore, connect
from appliance.storage.layered import LayeredDisk
from clients.client import FerryClient, FerryError
from messages.commands import (
    CancelRequest,
    CancelRequestBody,
    MigrationSelector,
    SyncRequest,
    SyncRequestBody,
)
from messages.common import MigrationState, PowerState
from messages.events import SourceCloneResponse
from tests.integration.conftest import Harness, RunningAppliance
from tests.integration.migration_helpers import Follower, clone_request, start_migration
from tests.support.lab import MIB, build_lab, cloud_volume, disk_digest, lab_vm, onprem_disk

StartAppliance = Callable[..., Awaitable[RunningAppliance]]
DATA_CHUNKS = (0, 2, 4, 6, 8, 10)  # 1 MiB of data at each of these MiB, holes between
BALLAST = 3 * MIB


@pytest.fixture
def small_cloud(harness: Harness) -> Iterator[Path]:
    """The cloud site's data directory on an 8 MiB tmpfs (we run as root); unmounted after."""
    cloud = harness.data_dir / "sites" / "cloud"
    cloud.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(cloud)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.fail(
            f"cannot mount an 8 MiB tmpfs at {cloud} (this test needs root and mount(8)): "
            f"{mounted.stderr.strip()}",
            pytrace=False,
        )
    try:
        yield cloud
    finally:
        if subprocess.run(["umount", str(cloud)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(cloud)], check=False)


async def _write(path: Path, chunks: tuple[int, ...], seed: int) -> None:
    rng = random.Random(seed)
    async with await LayeredDisk.open(path) as disk:
        for index in chunks:
            await disk.active().write(index * MIB, rng.randbytes(MIB))
        await disk.flush()


async def _checkpoint_fields(harness: Harness, transfer_id: str) -> int:
    store = StateStore(connect(harness.redis_url), Keys(harness.prefix))
    try:
        return int(await store.redis.hlen(store.keys.checkpoint(transfer_id)))
    finally:
        await store.close()


async def _copies(harness: Harness, migration_id: str) -> list[dict[str, object]]:
    store = StateStore(connect(harness.redis_url), Keys(harness.prefix))
    try:
        events = await EventLog(store).read(migration_id, count=1000)
    finally:
        await store.close()
    return [e.fields for e in events if e.kind == "disk_copied"]


async def test_out_of_space_fails_cleanly_keeps_the_data_and_resumes_once_space_is_freed(
    harness: Harness, small_cloud: Path, start_appliance: StartAppliance
) -> None:
    vm = lab_vm(1, disks=1, disk_size=24 * MIB)  # powered on, pool "Production"
    await build_lab(harness.data_dir, [vm], fill=False)
    source = onprem_disk(harness.data_dir, vm.vm_id, "disk-0")
    await _write(source, DATA_CHUNKS, seed=1)
    ballast = small_cloud / "ballast"
    ballast.write_bytes(random.Random(2).randbytes(BALLAST))

    running = await start_appliance(harness.settings(progress_interval_s=0.2))
    async with FerryClient(harness.client_settings()) as client:
        # 1 MB/s: the target's flushes make chunks durable before the disk fills up.
        request = clone_request(client, [vm.vm_id], bandwidth_mbps=8)
        follower = await start_migration(client, request)
        (failed,) = (await follower.finished(1)).values()
        migration_id = failed.migration_id
        volume_id = f"{migration_id}-disk-0"

        # A clean failure that says what happened, by name.
        assert failed.state is MigrationState.FAILED
        assert failed.error is not None and failed.error.code == "out_of_space"
        assert "no space left on" in failed.error.message and volume_id in failed.error.message
        onprem = LabSite.open(harness.data_dir / "sites" / "onprem")
        restored = await onprem.get_vm(vm.vm_id)
        assert restored.power_state is PowerState.ON and restored.resource_pool == "Production"
        cloud = LabSite.open(small_cloud)
        assert await cloud.list_vms() == []  # no cloud VM, half-made or not
        # The copied data and its checkpoints are kept for a resume.
        assert cloud_volume(harness.data_dir, volume_id).is_dir()
        assert await _checkpoint_fields(harness, f"{migration_id}/disk-0") > 2
        assert await _copies(harness, migration_id) == []  # the copy never finished

        # Space is freed; meanwhile the VM (running on-prem again) changed a chunk.
        ballast.unlink()
        await _write(source, (0,), seed=3)
        answer = await client.request(
            SyncRequest(
                body=SyncRequestBody(select=MigrationSelector(migration_ids=(migration_id,)))
            )
        )
        assert isinstance(answer, SourceCloneResponse)
        assert answer.body.state is MigrationState.QUEUED and answer.body.error is None
        (resumed,) = (await Follower(client, request.correlation_id).finished(1)).values()
    await running.shutdown()

    assert resumed.state is MigrationState.COMPLETED, resumed.error
    (copy,) = await _copies(harness, migration_id)
    assert copy["attempt"] == 1
    assert int(str(copy["chunks_skipped"])) > 0
    # What changed while it waited was sent again: the volume equals the disk as it is now.
    assert await disk_digest(cloud_volume(harness.data_dir, volume_id)) == await disk_digest(source)
    moved = await LabSite.open(harness.data_dir / "sites" / "onprem").get_vm(vm.vm_id)
    assert moved.power_state is PowerState.OFF and moved.resource_pool == "_HDM_MIGRATEPOOL"
    async with await LayeredDisk.open(source) as disk:
        assert disk.snapshots() == []  # the kept snapshot and the resume's are both gone


async def test_cancelling_a_failed_migration_drops_what_it_kept(
    harness: Harness, small_cloud: Path, start_appliance: StartAppliance
) -> None:
    vm = lab_vm(1, disks=1, disk_size=24 * MIB)
    await build_lab(harness.data_dir, [vm], fill=False)
    source = onprem_disk(harness.data_dir, vm.vm_id, "disk-0")
    await _write(source, DATA_CHUNKS, seed=1)
    (small_cloud / "ballast").write_bytes(random.Random(2).randbytes(BALLAST))
    running = await start_appliance(harness.settings(progress_interval_s=0.2))
    async with FerryClient(harness.client_settings()) as client:
        request = clone_request(client, [vm.vm_id], bandwidth_mbps=8)
        follower = await start_migration(client, request)
        (failed,) = (await follower.finished(1)).values()
        assert failed.error is not None and failed.error.code == "out_of_space"
        migration_id = failed.migration_id
        volume = cloud_volume(harness.data_dir, f"{migration_id}-disk-0")
        assert volume.is_dir()
        select = MigrationSelector(migration_ids=(migration_id,))
        answer = await client.request(CancelRequest(body=CancelRequestBody(select=select)))
        assert isinstance(answer, SourceCloneResponse)
        assert answer.body.state is MigrationState.FAILED
        assert not volume.exists()
        assert await _checkpoint_fields(harness, f"{migration_id}/disk-0") == 0
        with pytest.raises(FerryError) as refused:
            await client.request(SyncRequest(body=SyncRequestBody(select=select)))
        assert refused.value.code.value == "conflict"
    await running.shutdown()
    async with await LayeredDisk.open(source) as disk:
        assert disk.snapshots() == []
    assert await LabSite.open(small_cloud).list_vms() == []
