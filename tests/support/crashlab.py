"""A crash lab: the I/O manager and the cloud cache as killable processes, a link between.

    async with crash_lab(tmp_path, seed) as lab:
        lab.workload       # GuestWorkload on the cache export, logging to lab.log_path
        lab.vm             # the guest's view of its disk (survives cache restarts)
        lab.cache, lab.onprem   # HostProcess: call(), kill(), start()
        lab.proxy          # the link (reads and epoch bytes): drops, damage, trips
        await lab.restart_cache()   # after a kill: a new process, the guest reconnected

Layout: the on-prem disk is a LayeredDisk with a migrate-time snapshot; the
I/O manager host serves it on a fixed NBD port; ``proxy`` forwards to that
port; the cache host reads misses and ships epochs through ``proxy`` and
sends stage/commit orders to the I/O manager host's RPC socket.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from appliance.components.onprem import current_export
from appliance.datapath.nbd.backend import NbdBackend
from appliance.datapath.nbd.channel import TcpAddress
from appliance.sites.lab.workload import GuestWorkload, WorkloadLog, WorkloadSpec, WriteLog
from appliance.sites.lab.workload import read_write_log as read_log
from appliance.storage.extents import Extent
from tests.support.component_hosts import HostProcess
from tests.support.corrupting_proxy import CorruptingProxy
from tests.support.onprem import make_lab_disk

KIB = 1024
MIB = 1024 * KIB
DISK = "disk-0"
TOKEN = 1
LOCAL = "127.0.0.1"


class TrippingProxy(CorruptingProxy):
    """A CorruptingProxy that also says when a number of bytes went upstream (a trip)."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        super().__init__(upstream_host, upstream_port)
        self._trip: tuple[int, asyncio.Event] | None = None

    def trip_after(self, nbytes: int) -> asyncio.Event:
        """An event set once ``nbytes`` more bytes went from the cache towards on-prem."""
        event = asyncio.Event()
        self._trip = (nbytes, event)
        return event

    def disarm(self) -> None:
        """Forget a trip or a damage that has not happened yet."""
        self._trip = None
        self._corrupt_at = None

    def damage(self, data: bytes) -> bytes:
        if self._trip is not None:
            left, event = self._trip
            left -= len(data)
            if left <= 0:
                self._trip = None
                event.set()
            else:
                self._trip = (left, event)
        return super().damage(data)


class GuestDisk:
    """The guest's disk: the cache export, reconnected after a cache restart.

    It remembers the write in flight (sent, not acknowledged) and can signal
    when the n-th next operation or the next flush is issued (gates for kills).
    """

    def __init__(self, inner: NbdBackend) -> None:
        self.inner = inner
        self.in_flight: tuple[int, int] | None = None
        self._countdown: tuple[int, asyncio.Event] | None = None
        self._flush_issued: asyncio.Event | None = None

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def readonly(self) -> bool:
        return False

    def at_operation(self, count: int) -> asyncio.Event:
        """Set when the ``count``-th operation from now is issued."""
        event = asyncio.Event()
        self._countdown = (count, event)
        return event

    def at_flush(self) -> asyncio.Event:
        event = asyncio.Event()
        self._flush_issued = event
        return event

    def _tick(self) -> None:
        if self._countdown is not None:
            left, event = self._countdown
            if left <= 1:
                self._countdown = None
                event.set()
            else:
                self._countdown = (left - 1, event)

    async def read(self, offset: int, length: int) -> bytes:
        self._tick()
        return await self.inner.read(offset, length)

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        self._tick()
        self.in_flight = (offset, offset + len(data))
        await self.inner.write(offset, data)
        self.in_flight = None

    async def zero(self, offset: int, length: int, *, punch_hole: bool = False) -> None:
        self.in_flight = (offset, offset + length)
        await self.inner.zero(offset, length, punch_hole=punch_hole)
        self.in_flight = None

    async def flush(self) -> None:
        if self._flush_issued is not None:
            self._flush_issued.set()
            self._flush_issued = None
        await self.inner.flush()

    async def extents(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        return await self.inner.extents(offset, length)

    async def close(self) -> None:
        await self.inner.close()


@dataclass
class CrashLab:
    directory: Path
    base: bytes
    onprem: HostProcess
    cache: HostProcess
    proxy: TrippingProxy
    onprem_port: int
    vm: GuestDisk
    log: WriteLog
    log_path: Path
    workload: GuestWorkload

    async def restart_cache(self) -> None:
        """Start the (killed) cache again and point the guest's disk at it."""
        with contextlib.suppress(Exception):
            await self.vm.inner.close()
        port = int((await self.cache.start())[0])
        self.vm.inner = await NbdBackend.connect(TcpAddress(LOCAL, port), DISK)

    async def restart_onprem(self) -> None:
        await self.onprem.start()

    async def read_log(self) -> WorkloadLog:
        await self.log.sync()
        return await read_log(self.log_path)

    async def onprem_image(self) -> bytes:
        """The I/O manager's current image, read straight from it (not over the link)."""
        address = TcpAddress(LOCAL, self.onprem_port)
        async with await NbdBackend.connect(address, current_export(DISK)) as current:
            return await current.read(0, current.size)


@asynccontextmanager
async def crash_lab(
    tmp_path: Path, seed: int, size: int, spec: WorkloadSpec
) -> AsyncIterator[CrashLab]:
    snapshot_id, base = await make_lab_disk(tmp_path / "lab-disk", size, seed=seed)
    onprem = HostProcess(
        "onprem",
        [
            "--data",
            str(tmp_path / "onprem"),
            "--disk-dir",
            str(tmp_path / "lab-disk"),
            "--snapshot",
            snapshot_id,
        ],
        tmp_path / "onprem.sock",
        tmp_path / "onprem.err",
    )
    onprem_port = int((await onprem.start())[0])
    onprem.args += ["--port", str(onprem_port)]  # the same port after every restart
    try:
        async with TrippingProxy(LOCAL, onprem_port) as proxy:
            cache = HostProcess(
                "cache",
                [
                    "--data",
                    str(tmp_path / "cache"),
                    "--onprem-socket",
                    str(onprem.socket),
                    "--link-port",
                    str(proxy.port),
                    "--size",
                    str(size),
                ],
                tmp_path / "cache.sock",
                tmp_path / "cache.err",
            )
            try:
                port = int((await cache.start())[0])
                vm = GuestDisk(await NbdBackend.connect(TcpAddress(LOCAL, port), DISK))
                log_path = tmp_path / "writes.log"
                async with await WriteLog.create(log_path, seed=seed, disk_size=size) as log:
                    lab = CrashLab(
                        tmp_path,
                        base,
                        onprem,
                        cache,
                        proxy,
                        onprem_port,
                        vm,
                        log,
                        log_path,
                        GuestWorkload(vm, spec, log),
                    )
                    try:
                        yield lab
                    finally:
                        with contextlib.suppress(Exception):
                            await lab.vm.inner.close()
            finally:
                await cache.stop()
    finally:
        await onprem.stop()
