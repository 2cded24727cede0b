"""A cloud cache as its own process, for crash tests: ``python -m tests.support.cache_process DIR``.

It serves ``DIR/onprem.raw`` as on-prem (a LocalEpochSink in the same process),
opens disk-0 in a CloudCache on ``DIR/cache``, prints ``READY <port>`` and
runs until killed.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from appliance.components.cache.cache import CacheDiskOrder, CloudCache
from tests.support.cachelab import DISK, small_settings
from tests.support.epoch_sink import LocalEpochSink


async def main(directory: Path) -> None:
    image = directory / "onprem.raw"
    async with LocalEpochSink(directory / "staging", image) as sink:
        async with CloudCache(directory / "cache", small_settings(scale=1 / 256)) as cache:
            order = CacheDiskOrder(
                migration_id="mig-1",
                disk_id=DISK,
                token=1,
                size=image.stat().st_size,
                upstream=sink.address,
                upstream_export=sink.export,
                sink=sink,
            )
            await cache.open_disk(order)
            print(f"READY {cache.server.port}", flush=True)
            await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
