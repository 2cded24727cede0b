"""The cache component's /metrics, scraped over HTTP from the real process: its read hit and
miss counters equal the reads the test made through the NBD export, and its dirty bytes the
chunks it wrote (real component processes, a real redis-server)."""

from __future__ import annotations

from pathlib import Path

from appliance.components.heartbeat import ComponentReport
from appliance.datapath.nbd import NbdBackend
from appliance.embedded import RedisServer
from appliance.state.keys import Keys
from tests.support.components import CACHE, ONPREM, cached_disk
from tests.support.onprem import MIB, make_lab_disk
from tests.support.scrape import scrape

SIZE = 4 * MIB
DISK = "disk-1"
CHUNK = 64 * 1024  # the cache's chunk (FERRY_CACHE_CHUNK_SIZE's default)
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
        assert onprem_metrics[("ferry_component_up", (("kind", "onprem"), ("name", ONPREM.name)))]
