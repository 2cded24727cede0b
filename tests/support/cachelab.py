"""A cloud cache over a local stand-in for on-prem, reached through a fault proxy.

async with cache_lab(tmp_path, image_bytes, settings) as lab:
    lab.vm            # NbdBackend on the cache's export (what the cloud VM uses)
    lab.cache         # the CloudCache
    lab.sink          # LocalEpochSink: the on-prem image, staging, commits
    lab.proxy         # FaultProxy between the cache and on-prem (reads and shipping)
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from appliance.components.cache.cache import CacheDiskOrder, CloudCache
from appliance.components.cache.sizing import CacheSettings
from appliance.datapath.nbd.backend import NbdBackend
from tests.support.corrupting_proxy import CorruptingProxy
from tests.support.epoch_sink import LocalEpochSink

KiB = 1024
MiB = 1024 * KiB
DISK = "disk-0"


def image_bytes(size: int, seed: int = 7) -> bytes:
    """Random data with zero runs (holes once written sparse) and an unaligned tail."""
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(size))
    for _ in range(4):
        start = rng.randrange(0, size)
        end = min(size, start + rng.randrange(64 * KiB, 512 * KiB))
        data[start:end] = bytes(end - start)
    return bytes(data)


def write_sparse(path: Path, data: bytes, block: int = 4 * KiB) -> None:
    """Write ``data`` leaving all-zero blocks as holes."""
    with path.open("wb") as file:
        file.truncate(len(data))
        zero = bytes(block)
        for at in range(0, len(data), block):
            piece = data[at : at + block]
            if piece != zero[: len(piece)]:
                file.seek(at)
                file.write(piece)


def small_settings(**overrides: object) -> CacheSettings:
    values: dict[str, object] = {"scale": 1 / 1024, "retry_delay_s": 0.01}
    values.update(overrides)
    return CacheSettings(**values)  # type: ignore[arg-type]


@dataclass
class CacheLab:
    sink: LocalEpochSink
    proxy: CorruptingProxy
    cache: CloudCache
    vm: NbdBackend
    order: CacheDiskOrder

    async def reconnect_vm(self) -> None:
        await self.vm.close()
        self.vm = await NbdBackend.connect(self.cache.server.address, DISK)


@asynccontextmanager
async def cache_lab(
    tmp_path: Path,
    content: bytes,
    settings: CacheSettings | None = None,
    *,
    token: int = 1,
    cache_dir: Path | None = None,
) -> AsyncIterator[CacheLab]:
    image = tmp_path / "onprem.raw"
    if not image.exists():
        write_sparse(image, content)
    async with LocalEpochSink(tmp_path / "staging", image) as sink:
        async with CorruptingProxy("127.0.0.1", sink.server.port) as proxy:
            sink.proxy = proxy
            cache = CloudCache(cache_dir or tmp_path / "cache", settings or small_settings())
            async with cache:
                order = CacheDiskOrder(
                    migration_id="mig-1",
                    disk_id=DISK,
                    token=token,
                    size=len(content),
                    upstream=sink.address,
                    upstream_export=sink.export,
                    sink=sink,
                )
                await cache.open_disk(order)
                vm = await NbdBackend.connect(cache.server.address, DISK)
                lab = CacheLab(sink, proxy, cache, vm, order)
                try:
                    yield lab
                finally:
                    await lab.vm.close()
