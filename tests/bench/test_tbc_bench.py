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
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.components.heartbeat import ComponentHealth, ComponentReport
from appliance.datapath.nbd import NbdBackend
from appliance.embedded import RedisServer
from appliance.storage.layered import LayeredDisk
from clients.client import FerryClient
from messages.commands import SetPolicyRequest, SetPolicyRequestBody
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
    Guest,
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


INTERVAL_S = 10
WATCH_S = 65.0


def _newer_than(sequence: int) -> Callable[[ComponentReport], bool]:
    return lambda report: report.sequence > sequence


def _windows(beats: list[tuple[float, int, int]]) -> tuple[list[float], list[float]]:
    """From heartbeats ``(time, open epoch, committed epoch)``: the loss window at each
    beat (now minus the cut of the newest committed epoch: what a crash now would lose)
    and each epoch's cut-to-commit time. A cut is seen when the open epoch moves past it."""
    cut_at: dict[int, float] = {}
    committed_at: dict[int, float] = {}
    start = beats[0][0]
    for at, open_epoch, committed in beats:
        for epoch in range(1, open_epoch):
            cut_at.setdefault(epoch, at)
        committed_at.setdefault(committed, at)
    windows = [at - cut_at.get(committed, start) for at, _, committed in beats if at > start]
    commits = [committed_at[e] - cut_at[e] for e in committed_at if e in cut_at and e > 0]
    return windows, commits


async def test_tbc_loss_window_with_a_10_s_interval_under_the_workload(
    bench_harness: Harness, tmp_path: Path
) -> None:
    harness = bench_harness
    vm = lab_vm(1, disks=1, disk_size=256 * MIB)
    await build_lab(harness.data_dir, [vm])
    running = await RunningAppliance(harness.settings(**TBC_SETTINGS)).start()
    async with FerryClient(harness.client_settings()) as client, state_store(harness) as store:
        await components_up(store)
        policy = SetPolicyRequestBody(cluster="cluster-a", rto_rpo_interval_s=INTERVAL_S)
        await client.request(SetPolicyRequest(body=policy))
        follower = await start_migration(client, tbc_request(client, [vm.vm_id]))
        await follower.until(
            lambda latest: all(s.phase is Phase.IN_CLOUD for s in latest.values()), 600
        )
        (status,) = follower.latest.values()
        disk = f"{status.migration_id}-disk-0"
        address, export = await cloud_export(harness.data_dir, status.migration_id, "disk-0")
        guest = await Guest.start(address, export, tmp_path / "guest.log", seed=17)
        health = ComponentHealth(store, 120)
        beats: list[tuple[float, int, int]] = []
        seen = -1
        until = time.monotonic() + WATCH_S
        while time.monotonic() < until:
            report = await health.wait_until(CACHE, _newer_than(seen), 30)
            seen = report.sequence
            figures = report.figures
            beats.append(
                (
                    time.monotonic(),
                    int(figures["open_epoch"][disk]),
                    int(figures["committed_epoch"][disk]),
                )
            )
        writes = await guest.writes()
        await guest.halt()
        await client.request(migrate_back([status.migration_id]))
        await follower.until(
            lambda latest: all(s.state is MigrationState.MIGRATED_BACK for s in latest.values()),
            600,
        )
    await running.shutdown()
    windows, commits = _windows(beats)
    windows.sort()
    worst_commit = max(commits)
    bound = INTERVAL_S + worst_commit
    lines = [
        f"tbc loss window: {INTERVAL_S} s interval, the workload writing ({writes} writes), "
        f"{WATCH_S:.0f} s watched at every cache heartbeat ({len(windows)} moments)",
        f"  epochs committed:         {len(commits)}, cut to commit "
        f"{min(commits):.2f}-{worst_commit:.2f} s",
        f"  loss window p50/p95/max:  {windows[len(windows) // 2]:.2f} / "
        f"{windows[int(len(windows) * 0.95)]:.2f} / {windows[-1]:.2f} s",
        f"  target: max <= interval + time to commit one epoch = {bound:.2f} s: "
        f"{'met' if windows[-1] <= bound + 0.4 else 'NOT met'} (seen at heartbeats every 0.2 s)",
    ]
    text = "\n".join(lines)
    print("\n" + text)
    out = Path(".bench")
    out.mkdir(exist_ok=True)
    (out / "tbc-loss-window.txt").write_text(text + "\n")
