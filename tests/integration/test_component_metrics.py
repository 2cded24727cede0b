"""The cache component's /metrics, scraped over HTTP from the real process: its read hit and
miss counters equal the reads the test made through the NBD export, and its dirty bytes the
chunks it wrote (real component processes, a real redis-server)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from appliance.clock import SystemClock
from appliance.components.heartbeat import ComponentHealth, ComponentReport
from appliance.datapath.nbd import NbdBackend
from appliance.embedded import RedisServer
from appliance.metrics import MetricsEndpoint
from appliance.orchestrator.figures import CacheFigureReader
from appliance.orchestrator.record import DiskPlan, MigrationRecord, TransferOptions, dump
from appliance.orchestrator.states import Step, public_state
from appliance.service.metrics import ApplianceCollector, appliance_registry
from appliance.state.keys import Keys
from appliance.state.migrations import MigrationStore, NewMigration
from messages.common import MigrationType
from tests.support.components import CACHE, ONPREM, TIMEOUT_S, cached_disk
from tests.support.onprem import MIB, make_lab_disk
from tests.support.scrape import scrape

SIZE = 4 * MIB
DISK = "disk-1"
CHUNK = 64 * 1024  # the cache's chunk (FERRY_CACHE_CHUNK_SIZE's default)
AT = "2026-12-01T12:00:00+00:00"
METRICS = {"FERRY_COMPONENT_METRICS_BIND": "127.0.0.1:0", "FERRY_CACHE_SCALE": str(1 / 256)}


def _has_address(report: ComponentReport) -> bool:
    return "metrics_address" in report.figures and "exports" in report.figures


async def test_cache_metrics_count_the_reads_and_writes_made_through_its_export(
    redis_server: RedisServer, keys: Keys, tmp_path: Path
) -> None:
    snapshot_id, content = await make_lab_disk(tmp_path / "lab-disk", SIZE, seed=3)
    data_chunks = [c for c in range(SIZE // CHUNK) if any(content[c * CHUNK : (c + 1) * CHUNK])]
    assert len(data_chunks) >= 6
    async with cached_disk(
        redis_server,
        keys,
        tmp_path,
        disk_dir=tmp_path / "lab-disk",
        snapshot_id=snapshot_id,
        size=SIZE,
        disk_id=DISK,
        extra_env=METRICS,
    ) as cached:
        pair = cached.pair
        address = str((await pair.wait(CACHE, _has_address)).figures["metrics_address"])
        before = await scrape(address)
        hits0 = before.get(("ferry_cache_read_hits_total", (("disk", DISK),)), 0.0)
        misses0 = before.get(("ferry_cache_read_misses_total", (("disk", DISK),)), 0.0)

        missed, hit_twice = data_chunks[:5], data_chunks[:3]
        async with await NbdBackend.connect(cached.cache_address, cached.export) as disk:
            for chunk in missed:  # first read of each: fetched from on-prem
                data = await disk.read(chunk * CHUNK, CHUNK)
                assert data == content[chunk * CHUNK : (chunk + 1) * CHUNK]
            for _ in range(2):
                for chunk in hit_twice:  # read again: served by the cache
                    data = await disk.read(chunk * CHUNK, CHUNK)
                    assert data == content[chunk * CHUNK : (chunk + 1) * CHUNK]
            await disk.write(data_chunks[5] * CHUNK, b"\x5a" * CHUNK)  # a whole chunk: no fetch
            await disk.flush()

        after = await scrape(address)
        label = (("disk", DISK),)
        assert after[("ferry_cache_read_misses_total", label)] - misses0 == len(missed)
        assert after[("ferry_cache_read_hits_total", label)] - hits0 == 2 * len(hit_twice)
        assert after[("ferry_cache_dirty_bytes", label)] == CHUNK
        assert after[("ferry_cache_bytes", label)] >= (len(missed) + 1) * CHUNK
        assert after[("ferry_cache_epochs_in_flight", label)] == 0
        assert after[("ferry_component_up", (("kind", "cache"), ("name", CACHE.name)))] == 1
        assert after[("ferry_component_orders_total", (("outcome", "applied"),))] >= 1

        epoch = await cached.cut_and_commit()

        def cache_committed(report: ComponentReport) -> bool:
            figure = report.figures.get("committed_epoch", {})
            return isinstance(figure, dict) and figure.get(DISK) == epoch

        await pair.wait(CACHE, cache_committed)
        committed = await scrape(address)
        assert committed[("ferry_committed_epoch", label)] == epoch

        onprem = await pair.wait(ONPREM, _has_address)
        onprem_metrics = await scrape(str(onprem.figures["metrics_address"]))
        assert onprem_metrics[("ferry_committed_epoch", label)] == epoch
        assert onprem_metrics[("ferry_onprem_epochs_applied_total", ())] == 1
        assert onprem_metrics[("ferry_onprem_applied_bytes_total", ())] == CHUNK
        assert onprem_metrics[("ferry_onprem_staged_bytes_total", ())] == CHUNK
        shipped = committed[("ferry_cache_shipped_bytes_total", label)]
        assert shipped == CHUNK  # the one dirty chunk, sent once
        assert committed[("ferry_cache_ship_failures_total", label)] == 0
        assert committed[("ferry_cache_chunks_resent_total", label)] == 0
        assert onprem_metrics[("ferry_component_up", (("kind", "onprem"), ("name", ONPREM.name)))]


async def test_appliance_metrics_give_a_resting_vms_rpo_lag_type_state_and_bytes(
    redis_server: RedisServer, keys: Keys, tmp_path: Path
) -> None:
    snapshot_id, _ = await make_lab_disk(tmp_path / "lab-disk", SIZE, seed=4)
    async with cached_disk(
        redis_server,
        keys,
        tmp_path,
        disk_dir=tmp_path / "lab-disk",
        snapshot_id=snapshot_id,
        size=SIZE,
        disk_id=DISK,
        extra_env={"FERRY_CACHE_SCALE": str(1 / 256)},
    ) as cached:
        pair = cached.pair
        record = replace(
            _tbc_record(), step=Step.RUNNING_IN_CLOUD, bytes_total=SIZE, bytes_done=SIZE
        )
        migrations = MigrationStore(pair.store)
        public = public_state(record.step, False).value
        member = NewMigration(record.migration_id, record.step.value, public, dump(record))
        assert await migrations.create_group("g-1", "r-1", 1, [member])

        async with await NbdBackend.connect(cached.cache_address, cached.export) as disk:
            await disk.write(0, b"\x11" * CHUNK)
            await disk.flush()
        before_commit = time.monotonic()
        epoch = await cached.cut_and_commit()

        def committed(report: ComponentReport) -> bool:
            figure = report.figures.get("committed_epoch", {})
            return isinstance(figure, dict) and figure.get(DISK) == epoch

        await pair.wait(CACHE, committed)
        health = ComponentHealth(pair.store, TIMEOUT_S)
        collector = ApplianceCollector(
            migrations, health, CacheFigureReader(health, SystemClock()), [ONPREM, CACHE]
        )
        registry = appliance_registry(collector)
        async with MetricsEndpoint(registry, "127.0.0.1:0", collector.refresh) as endpoint:
            samples = await scrape(endpoint.address)
        since_commit = time.monotonic() - before_commit
        lag = samples[("ferry_rpo_lag_seconds", (("migration_id", "m-1"), ("vm", "vm-1")))]
        assert 0 <= lag <= since_commit + 0.05  # the lag is the age of the committed epoch
        assert samples[("ferry_migrations", (("state", public),))] == 1
        tbc = (("state", public), ("type", "tbc"))
        assert samples[("ferry_migrations_active", tbc)] == 1
        assert samples[("ferry_transfer_done_bytes", (("type", "tbc"),))] == SIZE
        assert samples[("ferry_transfer_rate_bytes_per_second", (("type", "tbc"),))] == 0
        assert samples[("ferry_component_healthy", (("kind", "cache"), ("name", "cache-1")))] == 1


def _tbc_record() -> MigrationRecord:
    plans = (DiskPlan(disk_id="src", label=DISK, capacity_bytes=SIZE, boot=False, volume_id=DISK),)
    return MigrationRecord(
        migration_id="m-1", request_id="r-1", correlation_id="c", group_id="g-1", admission=1,
        site="onprem", vm_id="vm-1", vm_name="vm-1", migration_type=MigrationType.TBC,
        step=Step.RUNNING_IN_CLOUD, target_site="cloud", target_pool=None, target_name="vm-1",
        network_map=(), options=TransferOptions(), disks=plans, created_at=AT, updated_at=AT,
        cache_node=CACHE.name,
    )  # fmt: skip
