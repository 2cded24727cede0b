"""The guest of the fault suite: the workload generator on the cache's export, riding out faults.

A guest whose disk errors out does what a hypervisor that reconnects does for it:
the failed request waits until the disk can be reached again and is sent again.
The wait is the case's ``recover`` (by default: a fresh heartbeat of the cache
with the disk exported, a condition read from Redis, never a sleep). After a
failure the writes acknowledged since the last completed FLUSH are sent again
before anything else: a crash of the cache may lose them (it owes only what a
FLUSH covered), and a guest that was told "flushed" afterwards would otherwise
count them as safe. Writes covered by a FLUSH before the failure are never sent
again, so the final check sees whether the cache kept its promise for them.

Every error is kept (``errors``), with the time it was seen, and wakes ``failed``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from appliance.datapath.nbd import NbdBackend
from appliance.datapath.nbd.channel import TcpAddress
from appliance.errors import DataPathError, TransientError
from appliance.sites.lab.workload import GuestWorkload, WorkloadSpec, WriteLog
from appliance.storage.extents import Extent

T = TypeVar("T")
Recover = Callable[[BaseException], Awaitable[None]]
DISK_ERRORS = (DataPathError, TransientError, OSError, EOFError)
RATE = 100.0
"""Operations per second the guest asks for (its own pacing, like a real workload's)."""


@dataclass(frozen=True, slots=True)
class DiskError:
    at: float  # time.monotonic()
    error: str


class SteadyDisk:
    """The cloud VM's disk (a Backend): the cache's export, retried across faults."""

    def __init__(self, inner: NbdBackend, recover: Recover) -> None:
        self.inner = inner
        self.recover = recover
        self.errors: list[DiskError] = []
        self.failed = asyncio.Condition()
        self._unflushed: list[tuple[int, bytes]] = []

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def readonly(self) -> bool:
        return False

    async def read(self, offset: int, length: int) -> bytes:
        return await self._steady(lambda: self.inner.read(offset, length))

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        payload = bytes(data)
        await self._steady(lambda: self.inner.write(offset, payload))
        self._unflushed.append((offset, payload))

    async def zero(self, offset: int, length: int, *, punch_hole: bool = False) -> None:
        await self.write(offset, bytes(length))

    async def flush(self) -> None:
        await self._steady(self.inner.flush)
        self._unflushed.clear()

    async def extents(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        return await self._steady(lambda: self.inner.extents(offset, length))

    async def close(self) -> None:
        await self.inner.close()

    async def _steady(self, call: Callable[[], Awaitable[T]]) -> T:
        while True:
            try:
                return await call()
            except DISK_ERRORS as error:
                await self._failed(error)

    async def _failed(self, error: BaseException) -> None:
        """Note the error, wait until the disk can be reached, send the unflushed writes again."""
        while True:
            self.errors.append(DiskError(time.monotonic(), f"{type(error).__name__}: {error}"))
            async with self.failed:
                self.failed.notify_all()
            await self.recover(error)
            try:
                for offset, payload in self._unflushed:
                    await self.inner.write(offset, payload)
            except DISK_ERRORS as again:
                error = again
                continue
            return


@dataclass
class FaultGuest:
    disk: SteadyDisk
    workload: GuestWorkload
    log: WriteLog
    log_path: Path
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    wrote: asyncio.Condition = field(default_factory=asyncio.Condition)
    """Notified after each batch of operations, and when the guest stops."""

    @classmethod
    async def start(
        cls, address: TcpAddress, export: str, log_path: Path, seed: int, recover: Recover
    ) -> FaultGuest:
        disk = SteadyDisk(await NbdBackend.connect(address, export), recover)
        log = await WriteLog.create(log_path, seed=seed, disk_size=disk.size, batch=16)
        workload = GuestWorkload(disk, WorkloadSpec(seed=seed, max_length=256 * 1024), log)
        guest = cls(disk, workload, log, log_path)
        guest.task = asyncio.create_task(guest._run())
        return guest

    async def _run(self) -> None:
        try:
            while not self.stop.is_set():
                await self.workload.run(count=10, rate=RATE, flush_every=8)
                async with self.wrote:
                    self.wrote.notify_all()
        finally:
            async with self.wrote:
                self.wrote.notify_all()

    @property
    def last_sequence(self) -> int:
        """The last write acknowledged (every write up to it is acknowledged)."""
        return self.workload.stats().last_sequence

    async def wait_writes(self, more: int, within_s: float) -> None:
        """Until the guest has written ``more`` times from now (woken after each batch)."""
        task = self.task
        assert task is not None
        wanted = self.workload.stats().writes + more
        async with asyncio.timeout(within_s), self.wrote:
            await self.wrote.wait_for(lambda: self.workload.stats().writes >= wanted or task.done())
        if task.done():
            task.result()  # its error, if it failed
        assert self.workload.stats().writes >= wanted, "the guest stopped"

    async def wait_error(self, within_s: float) -> DiskError:
        """Until the disk has failed once (a clear failure the guest saw)."""
        async with asyncio.timeout(within_s), self.disk.failed:
            await self.disk.failed.wait_for(lambda: bool(self.disk.errors))
        return self.disk.errors[0]

    async def halt(self) -> int:
        """Stop writing (like the guest of a VM being powered off), flushed; the last sequence."""
        self.stop.set()
        assert self.task is not None
        await self.task
        await self.workload.flush()
        await self.log.close()
        await self.disk.close()
        return self.last_sequence

    async def abandon(self) -> None:
        """Stop at once, for a VM whose disk is gone (recovered on-prem): nothing flushed."""
        self.stop.set()
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.log.close()
        await self.disk.close()
