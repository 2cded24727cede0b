"""``make bench``: reconcile passes and the cutover's whole-image check on a 4 GiB disk.

The cloud cache runs in this process over a stand-in for on-prem (a raw file of
data exported by an NBD server: the current image); the volume is a copy of that
file (the bulk copy), exported by another NBD server, as the cloud data plane's
would be. Epochs are cut but held from shipping, so nothing else loads the
machine. The guest writes 1% of the disk (random 64 KiB chunks), then:

* pass 1 copies it; the guest writes 0.1% more; pass 2 copies that;
* the cutover: the last pass (nothing left), then the whole-image check of the
  cache's ``image/<disk>`` export against the volume, once with both sides
  hashing their own blocks (files do) and once with both servers reading and
  hashing each block themselves (as the lab's layered views make them).

The table is printed and written to ``.bench/reconcile.txt``.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from appliance.components.cache.cache import CacheDiskOrder, CloudCache
from appliance.components.cache.image import image_export
from appliance.components.cache.reconcile import VolumeTarget
from appliance.components.cache.shipping import EpochManifest
from appliance.components.cache.sizing import CacheSettings
from appliance.components.reconciling import check_volume
from appliance.datapath.nbd import NbdBackend, NbdServer
from appliance.datapath.nbd.channel import NbdAddress
from appliance.storage.backend import Backend
from appliance.storage.extents import Extent
from appliance.storage.file import FileBackend
from tests.support.pagecache import settle

pytestmark = [pytest.mark.bench, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[2]
GIB = 1 << 30
MIB = 1 << 20
CHUNK = 64 * 1024
DISK = int(float(os.environ.get("FERRY_BENCH_DISK_GIB", "4")) * GIB)


class HeldSink:
    """Epochs are staged never: shipping waits, so the bench measures reconcile alone."""

    def __init__(self) -> None:
        self._never = asyncio.Event()

    async def stage(self, disk_id: str, epoch: int, token: int) -> tuple[NbdAddress, str]:
        await self._never.wait()
        raise AssertionError("unreachable")

    async def commit(self, disk_id: str, epoch: int, token: int, manifest: EpochManifest) -> None:
        raise AssertionError("nothing is staged")


class Unhashed:
    """A file as a backend that does not hash its own blocks (the server reads them)."""

    def __init__(self, inner: FileBackend) -> None:
        self._inner = inner

    @property
    def name(self) -> str:
        return self._inner.name

    @property
    def size(self) -> int:
        return self._inner.size

    @property
    def readonly(self) -> bool:
        return self._inner.readonly

    async def read(self, offset: int, length: int) -> bytes:
        return await self._inner.read(offset, length)

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        await self._inner.write(offset, data)

    async def zero(self, offset: int, length: int, *, punch_hole: bool = False) -> None:
        await self._inner.zero(offset, length, punch_hole=punch_hole)

    async def flush(self) -> None:
        await self._inner.flush()

    async def extents(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        return await self._inner.extents(offset, length)

    async def close(self) -> None:
        return None


@asynccontextmanager
async def served(exports: dict[str, Backend]) -> AsyncIterator[NbdServer]:
    server = NbdServer()
    for name, backend in exports.items():
        server.add_export(name, backend)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def make_files(directory: Path) -> tuple[Path, Path]:
    onprem, volume = directory / "onprem.raw", directory / "volume.raw"
    block = random.Random(3).randbytes(MIB)
    with onprem.open("wb") as file:
        for _ in range(DISK // MIB):
            file.write(block)
    shutil.copyfile(onprem, volume)
    settle(onprem, volume)
    return onprem, volume


async def guest_writes(vm: NbdBackend, rng: random.Random, fraction: float) -> None:
    for chunk in rng.sample(range(DISK // CHUNK), int(DISK * fraction) // CHUNK):
        await vm.write(chunk * CHUNK, rng.randbytes(CHUNK))
    await vm.flush()


async def bench(directory: Path) -> list[tuple[str, float, str]]:
    onprem_file, volume_file = make_files(directory)
    onprem, volume = FileBackend.open(onprem_file, readonly=True), FileBackend.open(volume_file)
    rows: list[tuple[str, float, str]] = []
    async with (
        served({"cur": onprem, "cur-unhashed": Unhashed(onprem)}) as upstream,
        served({"volume": volume, "volume-unhashed": Unhashed(volume)}) as cloud,
        CloudCache(directory / "cache", CacheSettings()) as cache,
    ):
        await cache.open_disk(
            CacheDiskOrder("m-1", "disk-1", 1, DISK, upstream.address, "cur", HeldSink())
        )
        target = VolumeTarget(cloud.address, "volume")
        rng = random.Random(7)
        async with await NbdBackend.connect(cache.server.address, "disk-1") as vm:
            await guest_writes(vm, rng, 0.01)
            for pass_no, more in ((1, 0.001), (2, 0.0), (3, 0.0)):
                started = time.monotonic()
                result = await cache.reconcile("disk-1", 1, pass_no, target)
                label = f"pass {pass_no}" + (" (the cutover's last)" if pass_no == 3 else "")
                detail = f"{result.chunks} chunks, {result.bytes / MIB:.1f} MiB"
                rows.append((label, time.monotonic() - started, detail))
                if more:
                    await guest_writes(vm, rng, more)
        started = time.monotonic()
        check = await check_volume(cache.server.address, image_export("disk-1"), target)
        assert check.equal, check
        rows.append(("whole-image check, both sides hash", time.monotonic() - started, "equal"))
        await cache.close_disk("disk-1", 1)
        await cache.open_disk(
            CacheDiskOrder("m-1", "disk-1", 1, DISK, upstream.address, "cur-unhashed", HeldSink())
        )
        started = time.monotonic()
        slow = VolumeTarget(cloud.address, "volume-unhashed")
        check = await check_volume(cache.server.address, image_export("disk-1"), slow)
        assert check.equal, check
        rows.append(("whole-image check, servers read", time.monotonic() - started, "equal"))
    await onprem.close()
    await volume.close()
    return rows


def test_reconcile_and_the_cutover_check(tmp_path: Path) -> None:
    rows = asyncio.run(bench(tmp_path))
    lines = [f"reconcile on a {DISK / GIB:g} GiB disk (1% then 0.1% written)"]
    lines += [f"  {label:<40} {seconds:7.2f} s   {detail}" for label, seconds, detail in rows]
    table = "\n".join(lines)
    print("\n" + table)
    out = ROOT / ".bench"
    out.mkdir(exist_ok=True)
    (out / "reconcile.txt").write_text(table + "\n")
