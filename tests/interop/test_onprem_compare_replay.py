"""``qemu-img compare``, an independent peer, finds the on-prem current image byte-equal to the
replay of the workload's write log up to each committed epoch's cut.

The lab's workload generator writes to the cloud cache's NBD export (flushing
like a guest); epochs are cut, shipped through a DirectEpochSink to a real
I/O manager and committed; qemu-img reads the manager's ``cur/`` export.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from appliance.components.cache.cache import CacheDiskOrder, CloudCache
from appliance.components.onprem import OnpremDiskOrder, OnpremIoManager, current_export
from appliance.datapath.nbd import NbdBackend, nbd_url
from appliance.sites.lab.workload import GuestWorkload, WorkloadSpec, WriteLog, read_write_log
from tests.support.cachelab import small_settings
from tests.support.direct_sink import DirectEpochSink
from tests.support.onprem import MIB, make_lab_disk
from tests.support.replay import replay

SIZE = 4 * MIB
DISK = "disk-r"
TOKEN = 1
TOOL_TIMEOUT = 60.0
EPOCHS = 4


async def qemu_img_compare(url: str, reference: Path) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        "qemu-img",
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        url,
        str(reference),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), TOOL_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, output.decode()


async def test_qemu_img_compare_onprem_current_image_with_the_write_log_replay(
    tmp_path: Path,
) -> None:
    snapshot_id, base = await make_lab_disk(tmp_path / "lab-disk", SIZE, seed=17)
    spec = WorkloadSpec(seed=17, read_ratio=0.2, max_length=256 * 1024, hot_fraction=0.1)
    order = OnpremDiskOrder("mig-r", DISK, TOKEN, tmp_path / "lab-disk", snapshot_id)
    log_path = tmp_path / "writes.log"
    async with OnpremIoManager(tmp_path / "onprem") as manager:
        await manager.open_disk(order)
        sink = DirectEpochSink(manager)
        cache = CloudCache(tmp_path / "cache", small_settings(scale=1 / 64))
        async with cache, await WriteLog.create(log_path, seed=17, disk_size=SIZE) as log:
            await cache.open_disk(
                CacheDiskOrder(
                    migration_id="mig-r",
                    disk_id=DISK,
                    token=TOKEN,
                    size=SIZE,
                    upstream=manager.address,
                    upstream_export=current_export(DISK),
                    sink=sink,
                )
            )
            url = nbd_url(manager.address, current_export(DISK))
            async with await NbdBackend.connect(cache.server.address, DISK) as vm:
                workload = GuestWorkload(vm, spec, log)
                previous = base
                for _ in range(EPOCHS):
                    await workload.run(count=12, flush_every=3)
                    cut = workload.stats().last_sequence
                    epoch = await cache.cut_epoch(DISK, TOKEN)
                    await cache.wait_committed(DISK, epoch)
                    await log.sync()
                    expected = replay(base, await read_write_log(log_path), cut)
                    reference = tmp_path / f"replay-{epoch}.raw"
                    reference.write_bytes(expected)
                    code, output = await qemu_img_compare(url, reference)
                    assert code == 0, f"epoch {epoch}: {output}"
                    assert expected != previous  # each epoch changed the disk...
                    stale = tmp_path / f"replay-before-{epoch}.raw"
                    stale.write_bytes(previous)
                    code, output = await qemu_img_compare(url, stale)
                    assert code == 1, output  # ...and qemu-img sees the difference
                    previous = bytes(expected)
        assert manager.committed_epoch(DISK) == EPOCHS
