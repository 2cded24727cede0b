"""Hosts of the data-plane components for crash tests (see ``component_hosts``).

    python -m tests.support.host_main onprem --socket S --data D --port P \\
        --disk-dir LAB --snapshot SNAP --disk-id disk-0 --token 1
    python -m tests.support.host_main cache --socket S --data D --onprem-socket OS \\
        --link-port PROXY --size N --disk-id disk-0 --token 1

Each prints ``@@READY <nbd port>`` once it serves, then answers RPCs on ``S``
until it is killed.

onprem ops: ``stage``, ``commit`` (the I/O manager's orders), ``arm`` (hold
the next commit of ``epoch`` after ``step``, printing ``@@PAUSED epoch step``),
``release`` (let a held commit go on).

cache ops: ``cut`` (an epoch number), ``wait_committed``, ``wait_failures``
(until the shipper failed that many attempts in all), ``status``.
Its epoch sink is a DirectEpochSink over the onprem host's RPC; its upstream
reads and its epoch bytes go through ``--link-port`` (a fault proxy).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from appliance.components.cache.cache import CacheDiskOrder, CloudCache
from appliance.components.onprem import (
    CommitStep,
    OnpremDiskOrder,
    OnpremIoManager,
    current_export,
)
from appliance.datapath.nbd.channel import TcpAddress
from appliance.logs import configure
from tests.support.cachelab import small_settings
from tests.support.component_hosts import (
    PREFIX,
    RpcOnprem,
    encode_error,
    manifest_from_json,
)
from tests.support.direct_sink import DirectEpochSink

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
MIGRATION = "mig-crash"


def say(*fields: object) -> None:
    print(PREFIX + " ".join(str(f) for f in fields), flush=True)


async def serve(socket_path: Path, handler: Handler) -> asyncio.Server:
    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = json.loads(await reader.readline())
            try:
                answer: dict[str, Any] = {"ok": await handler(request)}
            except Exception as exc:
                answer = encode_error(exc)
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, json.JSONDecodeError):
            pass
        finally:
            writer.close()

    return await asyncio.start_unix_server(one, str(socket_path))


class OnpremHost:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.armed: tuple[int, str] | None = None
        self.release = asyncio.Event()
        self.manager = OnpremIoManager(
            Path(args.data), address=TcpAddress("127.0.0.1", args.port), commit_hook=self.hook
        )

    async def hook(self, disk_id: str, epoch: int, step: CommitStep) -> None:
        if self.armed == (epoch, step.value):
            self.armed = None
            say("PAUSED", epoch, step.value)
            await self.release.wait()

    async def handle(self, request: dict[str, Any]) -> Any:
        op = request["op"]
        if op == "stage":
            address, export = await self.manager.stage_export(
                request["disk_id"], request["epoch"], request["token"]
            )
            assert isinstance(address, TcpAddress)
            return [address.host, address.port, export]
        if op == "commit":
            manifest = manifest_from_json(request["manifest"])
            await self.manager.commit_epoch(
                request["disk_id"], request["epoch"], request["token"], manifest
            )
            return None
        if op == "arm":
            self.release.clear()
            self.armed = (int(request["epoch"]), str(request["step"]))
            return None
        if op == "release":
            self.release.set()
            return None
        raise ValueError(f"unknown op {op}")

    async def run(self) -> None:
        args = self.args
        async with self.manager:
            order = OnpremDiskOrder(
                MIGRATION, args.disk_id, args.token, Path(args.disk_dir), args.snapshot
            )
            await self.manager.open_disk(order)
            server = await serve(Path(args.socket), self.handle)
            address = self.manager.address
            assert isinstance(address, TcpAddress)
            say("READY", address.port)
            async with server:
                await asyncio.Event().wait()


class CacheHost:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        link = TcpAddress("127.0.0.1", args.link_port)
        self.link = link
        self.sink = DirectEpochSink(RpcOnprem(Path(args.onprem_socket)), via=link)
        settings = small_settings(scale=args.scale, retry_delay_s=args.retry_delay)
        self.cache = CloudCache(Path(args.data), settings, address=TcpAddress("127.0.0.1", 0))

    async def handle(self, request: dict[str, Any]) -> Any:
        op = request["op"]
        disk_id, token = self.args.disk_id, self.args.token
        shipper = self.cache._opened(disk_id).shipper
        if op == "cut":
            return await self.cache.cut_epoch(disk_id, token)
        if op == "wait_committed":
            await self.cache.wait_committed(disk_id, int(request["epoch"]))
            return None
        if op == "wait_failures":
            while shipper.failures < int(request["failures"]):
                shipper.failed.clear()
                await shipper.failed.wait()
            return shipper.failures
        if op == "status":
            disk = self.cache.status().disks[0]
            return {
                "committed": disk.committed_epoch,
                "open": disk.open_epoch,
                "in_flight": list(disk.epochs_in_flight),
                "failures": shipper.failures,
                "mismatches": shipper.mismatches,
                "resent": shipper.already_committed,
            }
        raise ValueError(f"unknown op {op}")

    async def run(self) -> None:
        args = self.args
        async with self.cache:
            order = CacheDiskOrder(
                migration_id=MIGRATION,
                disk_id=args.disk_id,
                token=args.token,
                size=args.size,
                upstream=self.link,
                upstream_export=current_export(args.disk_id),
                sink=self.sink,
            )
            await self.cache.open_disk(order)
            server = await serve(Path(args.socket), self.handle)
            say("READY", self.cache.server.port)
            async with server:
                await asyncio.Event().wait()


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="host_main")
    parser.add_argument("kind", choices=["onprem", "cache"])
    parser.add_argument("--socket", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--disk-id", default="disk-0")
    parser.add_argument("--token", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--disk-dir")
    parser.add_argument("--snapshot")
    parser.add_argument("--onprem-socket")
    parser.add_argument("--link-port", type=int)
    parser.add_argument("--size", type=int)
    parser.add_argument("--scale", type=float, default=1 / 64)
    parser.add_argument("--retry-delay", type=float, default=0.05)
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse(argv)
    configure("info", "console", sys.stderr)
    host = OnpremHost(args) if args.kind == "onprem" else CacheHost(args)
    asyncio.run(host.run())


if __name__ == "__main__":
    main(sys.argv[1:])
