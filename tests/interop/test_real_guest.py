"""A real Linux guest writes ext4 over NBD; its disk then passes e2fsck with every synced file.

The guest (tests/interop/guests/, Debian's cloud kernel and busybox) boots
under QEMU with its one disk on an NBD export, writes batches of files with
known bytes and syncs after each, printing ``FERRY-SYNCED <k>``. The exports
are the independent peer (qemu-nbd on a raw file) and Ferry's own NBD server
(on a raw file and on a LayeredDisk's active view); the cache's export joins
them as one more entry in ``EXPORTS``: the guest's disk is the cloud cache's
export (the cache and the on-prem I/O manager run as component processes), and
the image checked is on-prem's current image after the next epoch committed.
After the guest stops, the image is checked without mounting it: ``e2fsck -fn``
clean, and every file of every batch whose marker the guest printed is present
with exactly its bytes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.datapath.nbd.server import NbdServer
from appliance.embedded import RedisServer
from appliance.state.keys import Keys
from appliance.storage.file import FileBackend
from appliance.storage.layered import DiskView, LayeredDisk
from tests.support.components import cached_disk
from tests.support.ext4 import check_disk, make_ext4, read_tree, replay_journal
from tests.support.guest import GuestImage, GuestVm, Workload, build_guest, qemu_nbd_export
from tests.support.sparse import file_data_ranges

MiB = 1024 * 1024
SIZE = 64 * MiB
COPY_CHUNK = 1 * MiB
# TCG boots and runs a workload here in ~3 s; the bounds only stop a hung guest.
RUN_TIMEOUT = 240.0

pytestmark = pytest.mark.timeout(600)


@dataclass(frozen=True)
class Exported:
    """An NBD export of the guest's disk, and how to get that disk as a raw image."""

    url: str
    raw_image: Callable[[], Awaitable[Path]]  # called after the guest stopped


ExportFactory = Callable[[Path, Path], AbstractAsyncContextManager[Exported]]


@asynccontextmanager
async def on_qemu_nbd(prepared: Path, work: Path) -> AsyncIterator[Exported]:
    async def raw() -> Path:
        return prepared

    async with qemu_nbd_export(prepared) as url:
        yield Exported(url, raw)


@asynccontextmanager
async def on_ferry_raw(prepared: Path, work: Path) -> AsyncIterator[Exported]:
    async def raw() -> Path:
        return prepared

    async with FileBackend.open(prepared) as backend, NbdServer({"disk": backend}) as server:
        yield Exported(server.url("disk"), raw)


async def copy_in(image: Path, view: DiskView) -> None:
    """Write the allocated ranges of a raw ``image`` into ``view``."""
    with image.open("rb") as source:
        for start, end in file_data_ranges(image):
            for offset in range(start, end, COPY_CHUNK):
                source.seek(offset)
                await view.write(offset, source.read(min(COPY_CHUNK, end - offset)))
    await view.flush()


async def copy_out(view: DiskView, image: Path) -> Path:
    """``view`` as a sparse raw file: its data extents written, its holes left holes."""
    with image.open("wb") as target:
        target.truncate(view.size)
        for extent in await view.extents():
            if not extent.data:
                continue
            for offset in range(extent.start, extent.end, COPY_CHUNK):
                target.seek(offset)
                target.write(await view.read(offset, min(COPY_CHUNK, extent.end - offset)))
    return image


@asynccontextmanager
async def on_ferry_layered(prepared: Path, work: Path) -> AsyncIterator[Exported]:
    async with await LayeredDisk.create(work / "layered", SIZE) as disk:
        await copy_in(prepared, disk.active())
        await disk.snapshot("mkfs")

        async def raw() -> Path:
            return await copy_out(disk.active(), work / "active.raw")

        async with NbdServer({"disk": disk.active()}) as server:
            yield Exported(server.url("disk"), raw)


@asynccontextmanager
async def on_ferry_cache(prepared: Path, work: Path) -> AsyncIterator[Exported]:
    """The guest's disk on the cloud cache; on-prem serves ``prepared`` as the migrate-time
    snapshot. The image checked is on-prem's current image once the epoch cut after the
    guest stopped has committed: every write the guest made reached on-prem that way."""
    async with await LayeredDisk.create(work / "onprem-disk", SIZE) as disk:
        await copy_in(prepared, disk.active())
        snapshot = await disk.snapshot("migrate")
    redis_server = RedisServer(work / "redis")
    await redis_server.start()
    try:
        async with cached_disk(
            redis_server,
            Keys("guest"),
            work / "components",
            disk_dir=work / "onprem-disk",
            snapshot_id=snapshot.id,
            size=SIZE,
            # A 48 MiB cache for the 64 MiB disk: early epochs cut themselves as it fills.
            extra_env={"FERRY_CACHE_SCALE": str(1 / 64)},
        ) as cached:

            async def raw() -> Path:
                await cached.cut_and_commit()
                return await cached.current_image(work / "onprem-current.raw")

            yield Exported(cached.url, raw)
    finally:
        await redis_server.stop()


EXPORTS: dict[str, ExportFactory] = {
    "qemu-nbd": on_qemu_nbd,
    "ferry-raw": on_ferry_raw,
    "ferry-layered": on_ferry_layered,
    "ferry-cache": on_ferry_cache,
}


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    return build_guest()


@pytest.fixture
async def prepared(tmp_path: Path) -> Path:
    """A fresh ext4 made on the host, the guest's disk."""
    image = tmp_path / "disk.raw"
    await make_ext4(image, SIZE)
    return image


@pytest.mark.parametrize("export", sorted(EXPORTS))
async def test_guest_files_synced_then_unmounted_pass_fsck(
    export: str, guest_image: GuestImage, prepared: Path, tmp_path: Path
) -> None:
    workload = Workload(batches=3, files=4, seed=11, end="unmount")
    async with EXPORTS[export](prepared, tmp_path) as exported:
        async with GuestVm(
            guest_image, exported.url, workload, console=tmp_path / "console.log"
        ) as vm:
            await vm.wait_exit(RUN_TIMEOUT)
        assert (vm.synced, vm.done) == (3, True)
        image = await exported.raw_image()
    # Unmounted cleanly: the image itself, journal and all, is clean.
    await check_disk(image, workload.expected(3))
    assert len(await read_tree(image, "ferry")) == 12


@pytest.mark.parametrize("export", sorted(EXPORTS))
async def test_power_cut_keeps_every_file_synced_before_it(
    export: str, guest_image: GuestImage, prepared: Path, tmp_path: Path
) -> None:
    workload = Workload(batches=0, files=4, seed=23)  # writes until it is stopped
    async with EXPORTS[export](prepared, tmp_path) as exported:
        async with GuestVm(
            guest_image, exported.url, workload, console=tmp_path / "console.log"
        ) as vm:
            await vm.wait_synced(3, RUN_TIMEOUT)
            await vm.kill()  # mid-batch: files half written, the file system mounted
        image = await exported.raw_image()
    assert vm.synced >= 3
    # Every marker printed before the cut is a sync that returned: all of it is there.
    await check_disk(image, workload.expected(vm.synced), replay=True)


async def test_snapshot_of_running_guest_is_that_point_in_time(
    guest_image: GuestImage, prepared: Path, tmp_path: Path
) -> None:
    """A LayeredDisk snapshot under a mounted, writing guest: crash-consistent, exact in time."""
    workload = Workload(batches=4, files=4, seed=5, end="crash", step=True)
    async with await LayeredDisk.create(tmp_path / "layered", SIZE) as disk:
        await copy_in(prepared, disk.active())
        mkfs = await disk.snapshot("mkfs")
        async with NbdServer({"disk": disk.active()}) as server:
            async with GuestVm(
                guest_image, server.url("disk"), workload, console=tmp_path / "console.log"
            ) as vm:
                await vm.wait_synced(1, RUN_TIMEOUT)
                await vm.proceed()
                await vm.wait_synced(2, RUN_TIMEOUT)
                # The guest waits for us after batch 2: batch 3 has not begun.
                during = await disk.snapshot("during")
                for batch in (3, 4):
                    await vm.proceed()
                    await vm.wait_synced(batch, RUN_TIMEOUT)
                await vm.proceed()
                await vm.wait_exit(RUN_TIMEOUT)
        at_mkfs = await copy_out(disk.at(mkfs.id), tmp_path / "mkfs.raw")
        at_during = await copy_out(disk.at(during.id), tmp_path / "during.raw")
        now = await copy_out(disk.active(), tmp_path / "now.raw")
    await check_disk(at_mkfs, {})
    with pytest.raises(AssertionError, match="rdump"):
        await read_tree(at_mkfs, "ferry")
    await check_disk(now, workload.expected(4), replay=True)
    await check_disk(at_during, workload.expected(2), replay=True)
    # Exactly batches 1 and 2: nothing the guest wrote after the snapshot leaks into it.
    replayed = tmp_path / "during-replayed.raw"
    await replay_journal(at_during, replayed)
    assert await read_tree(replayed, "ferry") == workload.expected(2)
