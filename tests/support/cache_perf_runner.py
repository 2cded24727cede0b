"""A cloud cache over a local on-prem stand-in, as its own process, for fio measurements.

``python -m tests.support.cache_perf_runner DIR [--size BYTES]`` makes
``DIR/onprem.raw`` (random data, if absent), serves it as on-prem (a
LocalEpochSink in this process), opens ``disk-0`` in a CloudCache on
``DIR/cache`` with the default settings (the sizing rule at scale 1: a 1 GiB
disk fits wholly, so a warm-up pass makes every later request a hit; no timed
epochs), prints ``READY <port>`` and runs until SIGTERM/SIGINT. Its loop runs
the way the appliance's processes run theirs (uvloop when installed).
``--upstream HOST:PORT --upstream-export NAME`` reads misses from another NBD
server instead (a qemu-nbd of the same image, say).

    fio --name=w --ioengine=nbd --uri=nbd://127.0.0.1:PORT/disk-0 --rw=randwrite \
        --bs=4k --iodepth=16 --time_based --runtime=6 --norandommap --randrepeat=0
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from pathlib import Path

from appliance.cli import run_async
from appliance.components.cache.cache import CacheDiskOrder, CloudCache
from appliance.components.cache.sizing import CacheSettings
from appliance.datapath.nbd.channel import TcpAddress
from tests.support.epoch_sink import LocalEpochSink

DISK = "disk-0"
MiB = 1024 * 1024


def make_image(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size == size:
        return
    with path.open("wb") as file:
        for _ in range(0, size, 16 * MiB):
            file.write(os.urandom(16 * MiB))
        file.truncate(size)
        os.fsync(file.fileno())


async def serve(directory: Path, size: int, upstream: TcpAddress | None, export: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    image = directory / "onprem.raw"
    make_image(image, size)
    settings = CacheSettings(epoch_interval_s=None)
    address = TcpAddress("127.0.0.1", 0)
    async with (
        LocalEpochSink(directory / "staging", image) as sink,
        CloudCache(directory / "cache", settings, address=address) as cache,
    ):
        order = CacheDiskOrder(
            migration_id="mig-1",
            disk_id=DISK,
            token=1,
            size=size,
            upstream=upstream or sink.address,
            upstream_export=export if upstream else sink.export,
            sink=sink,
        )
        await cache.open_disk(order)
        print(f"READY {cache.server.port}", flush=True)
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--size", type=int, default=1024 * MiB)
    parser.add_argument("--upstream", help="HOST:PORT of another on-prem NBD server to read")
    parser.add_argument("--upstream-export", default="")
    args = parser.parse_args()
    args.directory.mkdir(parents=True, exist_ok=True)
    upstream = None
    if args.upstream:
        host, _, port = args.upstream.rpartition(":")
        upstream = TcpAddress(host, int(port))
    run_async(serve(args.directory, args.size, upstream, args.upstream_export))


if __name__ == "__main__":
    main()
