"""A tbc VM's status carries its cache's figures: the last committed epoch and when, the RPO
lag, dirty bytes and cache use, read from the real cache component's heartbeat (real
component processes, a real redis-server); a cold migration's carry none."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import redis.asyncio as aioredis

from appliance.clock import SystemClock
from appliance.components.heartbeat import ComponentHealth, ComponentReport
from appliance.datapath.nbd import NbdBackend
from appliance.embedded import RedisServer
from appliance.orchestrator.figures import CacheFigureReader
from appliance.orchestrator.record import DiskPlan, MigrationRecord, TransferOptions
from appliance.orchestrator.reporting import Reporter
from appliance.orchestrator.states import Step
from appliance.sink import MemorySink
from appliance.state.keys import Keys
from appliance.state.policy import Policies, Policy, PolicyDefaults
from messages.common import MigrationType
from tests.support.components import CACHE, TIMEOUT_S, cached_disk
from tests.support.onprem import MIB, make_lab_disk

SIZE = 4 * MIB
DISK = "disk-1"
CHUNK = 64 * 1024  # the cache's chunk (FERRY_CACHE_CHUNK_SIZE's default)
AT = "2026-12-01T12:00:00+00:00"


def _record(kind: MigrationType, disks: tuple[str, ...] = (DISK,)) -> MigrationRecord:
    plans = tuple(
        DiskPlan(disk_id=f"src-{d}", label=d, capacity_bytes=SIZE, boot=False, volume_id=d)
        for d in disks
    )
    return MigrationRecord(
        migration_id="m-1", request_id="r", correlation_id="c", group_id="g-1", admission=1,
        site="onprem", vm_id="vm-1", vm_name="vm-1", migration_type=kind,
        step=Step.POWERING_ON, target_site="cloud", target_pool=None, target_name="vm-1",
        network_map=(), options=TransferOptions(), disks=plans, created_at=AT, updated_at=AT,
        cache_node=CACHE.name,
    )  # fmt: skip


def dirty_is(size: int) -> Callable[[ComponentReport], bool]:
    def seen(report: ComponentReport) -> bool:
        dirty = report.figures.get("dirty_bytes_per_disk", {})
        return isinstance(dirty, dict) and dirty.get(DISK) == size

    return seen


async def test_status_of_a_tbc_vm_carries_its_epoch_lag_dirty_bytes_and_cache_use(
    redis: aioredis.Redis, redis_server: RedisServer, keys: Keys, tmp_path: Path
) -> None:
    snapshot_id, _ = await make_lab_disk(tmp_path / "lab-disk", SIZE, seed=7)
    rng = random.Random(5)
    async with cached_disk(
        redis_server,
        keys,
        tmp_path,
        disk_dir=tmp_path / "lab-disk",
        snapshot_id=snapshot_id,
        size=SIZE,
        disk_id=DISK,
        extra_env={"FERRY_CACHE_SCALE": str(1 / 256)},  # no early epoch cuts itself
    ) as cached:
        pair = cached.pair
        figures = CacheFigureReader(ComponentHealth(pair.store, TIMEOUT_S), SystemClock())
        reporter = Reporter("ferry-it", MemorySink(), SystemClock(), figures)
        tbc = _record(MigrationType.TBC)

        chunks = rng.sample(range(SIZE // CHUNK), 8)
        async with await NbdBackend.connect(cached.cache_address, cached.export) as disk:
            for chunk in chunks:  # whole chunks: nothing is read through, all of it is dirty
                await disk.write(chunk * CHUNK, rng.randbytes(CHUNK))
            await disk.flush()
        await pair.wait(CACHE, dirty_is(8 * CHUNK))
        status = await reporter.status(tbc, False)
        assert status.committed_epoch == 0
        assert status.dirty_bytes == 8 * CHUNK and status.cache_bytes == 8 * CHUNK
        # The dirty-bytes threshold of the VM's policy (default 10 GB, then set lower).
        policies = Policies(pair.store, PolicyDefaults())
        assert not await figures.dirty_over_threshold(tbc, policies)
        await policies.set("lab", Policy(rpo_dirty_bytes=8 * CHUNK))
        assert not await figures.dirty_over_threshold(tbc, policies), "another cluster's"
        await policies.set(None, Policy(rpo_dirty_bytes=8 * CHUNK))
        assert await figures.dirty_over_threshold(tbc, policies)
        assert status.rpo_lag_s is not None and status.last_epoch_at is not None
        lag_before = status.rpo_lag_s

        before_commit = datetime.now(UTC)
        assert await cached.cut_and_commit() == 1
        await pair.wait(
            CACHE,
            lambda r: (
                r.figures.get("committed_epoch", {}).get(DISK) == 1
                and r.figures.get("dirty_bytes_per_disk", {}).get(DISK) == 0
            ),
        )
        after = await reporter.status(tbc, False)
        assert after.committed_epoch == 1 and after.dirty_bytes == 0
        assert after.cache_bytes == 8 * CHUNK  # committed chunks stay, clean
        assert after.last_epoch_at is not None and after.last_epoch_at >= before_commit
        assert after.rpo_lag_s is not None
        assert after.rpo_lag_s <= (datetime.now(UTC) - before_commit).total_seconds() + 0.5
        assert lag_before >= 0

        cold = await reporter.status(_record(MigrationType.COLD), False)
        assert (cold.committed_epoch, cold.rpo_lag_s, cold.dirty_bytes, cold.cache_bytes) == (
            None,
            None,
            None,
            None,
        )
        assert not await figures.dirty_over_threshold(tbc, policies)  # all committed now
        # A VM with a disk the cache does not serve: nothing is guessed for it.
        partial = await reporter.status(_record(MigrationType.TBC, (DISK, "disk-9")), False)
        assert partial.dirty_bytes is None and partial.rpo_lag_s is None
        assert partial.last_epoch_at is None
