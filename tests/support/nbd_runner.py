"""Ferry's NBD server on one raw file, as its own process, for benchmarks.

``python -m tests.support.nbd_runner FILE [--export NAME] [--readonly]`` serves
FILE over TCP on 127.0.0.1 (a free port), prints ``READY <port>`` and runs
until SIGTERM/SIGINT. It runs its loop the way the appliance's processes do
(:func:`appliance.cli.run_async`: uvloop when installed).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

from appliance.cli import run_async
from appliance.datapath.nbd import NbdServer
from appliance.datapath.nbd.channel import TcpAddress
from appliance.storage.file import FileBackend


async def serve(path: Path, export: str, *, readonly: bool) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with (
        FileBackend.open(path, readonly=readonly) as backend,
        NbdServer({export: backend}, address=TcpAddress("127.0.0.1", 0)) as server,
    ):
        print(f"READY {server.port}", flush=True)
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("file", type=Path)
    parser.add_argument("--export", default="disk")
    parser.add_argument("--readonly", action="store_true")
    args = parser.parse_args()
    run_async(serve(args.file, args.export, readonly=args.readonly))


if __name__ == "__main__":
    main()
