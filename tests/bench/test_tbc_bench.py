"""``make bench``: a planned migrate back of a tbc VM, over SQS with the real components.

One VM with a 4 GiB disk (about half allocated) goes to the cloud (tbc); its
"guest" writes 5% of the disk (1 MiB writes at distinct offsets) through the
cache's export and stops; then a MigrateBackRequest. Figures:

* time to the cloud: request sent to the VM running in the cloud;
* dirty bytes in the cache when the migrate back is asked (the cache's figures);
* migrate back wall time: request sent to MIGRATED_BACK received;
* bytes moved on-prem by the migrate back (the I/O manager's staged data bytes, its
  ``bytes_staged`` figure, before and after) beside the dirty bytes (target <= 1.02x);
* the written ranges read back on-prem equal what the guest wrote.

Printed and written to ``.bench/tbc.txt``.
"""

from __future__ import annotations

import random
import time
import uuid
from pathlib import Path

import pytest

from appliance.components.heartbeat import ComponentHealth
from appliance.datapath.nbd import NbdBackend
from appliance.embedded import RedisServer
from appliance.storage.layered import LayeredDisk
from clients.client import FerryClient
from messages.common import MigrationState, Phase
from tests.integration.conftest import (
    Harness,
    RunningAppliance,
    localstack,  # noqa: F401  (the session fixture)
)
from tests.integration.migration_helpers import start_migration
from tests.integration.tbc_helpers import (
    CACHE,
    ONPREM,
    TBC_SETTINGS,
    cloud_export,
    components_up,
    migrate_back,
    state_store,
    tbc_request,
)
from tests.support.lab import MIB, build_lab, lab_vm, onprem_disk

pytestmark = [pytest.mark.bench, pytest.mark.timeout(1800)]
SIZE = 4096 * MIB
DIRTY = 0.05


@pytest.fixture
def bench_harness(
    localstack: str,  # noqa: F811  (the session fixture, by name)
    redis_server: RedisServer,
    key_prefix: str,
    data_dir: Path,
) -> Harness:
    return Harness(localstack, redis_server.url, key_prefix, data_dir, uuid.uuid4().hex[:10])


async def _staged(health: ComponentHealth) -> int:
    """The I/O manager's data bytes staged so far, from a heartbeat newer than now."""
    seen = (await health.report(ONPREM)).sequence or 0
    report = await health.wait_until(ONPREM, lambda r: (r.sequence or 0) > seen, 60)
    return int(report.figures["bytes_staged"])


async def test_tbc_migrate_back_of_a_4_gib_disk_with_5_percent_dirty(
    bench_harness: Harness,
) -> None:
    harness = bench_harness
    vm = lab_vm(1, disks=1, disk_size=SIZE)
    await build_lab(harness.data_dir, [vm])
    running = await RunningAppliance(harness.settings(**TBC_SETTINGS)).start()
    rng = random.Random(3)
    chunks = SIZE // MIB
    offsets = sorted(rng.sample(range(chunks), int(chunks * DIRTY)))
    written = {index * MIB: rng.randbytes(MIB) for index in offsets}
    async with FerryClient(harness.client_settings()) as client, state_store(harness) as store:
        await components_up(store)
        started = time.monotonic()
        follower = await start_migration(client, tbc_request(client, [vm.vm_id]))
        await follower.until(
            lambda latest: all(s.phase is Phase.IN_CLOUD for s in latest.values()), 600
        )
        to_cloud = time.monotonic() - started
        (status,) = follower.latest.values()
        disk = f"{status.migration_id}-disk-0"
        address, export = await cloud_export(harness.data_dir, status.migration_id, "disk-0")
        async with await NbdBackend.connect(address, export) as guest:
            for offset, data in written.items():
                await guest.write(offset, data)
            await guest.flush()
        wrote = len(written) * MIB
        cache = await ComponentHealth(store, 120).wait_until(
            CACHE, lambda r: r.figures.get("dirty_bytes_per_disk", {}).get(disk, 0) >= wrote, 60
        )
        dirty = int(cache.figures["dirty_bytes_per_disk"][disk])
        health = ComponentHealth(store, 120)
        staged_before = await _staged(health)
        started = time.monotonic()
        await client.request(migrate_back([status.migration_id]))
        await follower.until(
            lambda latest: all(s.state is MigrationState.MIGRATED_BACK for s in latest.values()),
            900,
        )
        back = time.monotonic() - started
        moved = await _staged(health) - staged_before
    await running.shutdown()
    async with await LayeredDisk.open(onprem_disk(harness.data_dir, vm.vm_id, "disk-0")) as d:
        for offset, data in written.items():
            assert await d.active().read(offset, len(data)) == data
    lines = [
        "tbc: 4 GiB disk, the guest wrote 5% (1 MiB writes), planned migrate back",
        f"  to the cloud:        {to_cloud:8.2f} s",
        f"  written by the guest: {wrote / MIB:7.0f} MiB",
        f"  dirty in the cache:  {dirty / MIB:8.1f} MiB",
        f"  migrate back:        {back:8.2f} s (request to migrated_back)",
        f"  bytes moved on-prem: {moved / MIB:8.1f} MiB, {moved / dirty:.3f}x the dirty bytes"
        " (target <= 1.02x)",
    ]
    text = "\n".join(lines)
    print("\n" + text)
    out = Path(".bench")
    out.mkdir(exist_ok=True)
    (out / "tbc.txt").write_text(text + "\n")
