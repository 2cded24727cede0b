"""A cloud volume for reconcile tests: a raw file the bulk copy filled, served over NBD.

async with served_volume(tmp_path / "volume.raw", snapshot) as volume:
    volume.target          # VolumeTarget: what a reconcile order names
    volume.backend.gate    # set to an Event: writes wait there (write_started is set)
    volume.backend.writes  # (offset, length) of every write and zero that landed
    volume.read()          # the file's bytes
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from appliance.components.cache.reconcile import VolumeTarget
from appliance.datapath.nbd.server import NbdServer
from appliance.storage.extents import Extent
from appliance.storage.file import FileBackend
from tests.support.cachelab import write_sparse

EXPORT = "volume"


class GatedVolume:
    """The volume as served: records what lands, and holds writes at ``gate`` when set."""

    def __init__(self, inner: FileBackend) -> None:
        self._inner = inner
        self.writes: list[tuple[int, int]] = []
        self.write_started = asyncio.Event()
        self.gate: asyncio.Event | None = None
        self._busy = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def name(self) -> str:
        return self._inner.name

    @property
    def size(self) -> int:
        return self._inner.size

    @property
    def readonly(self) -> bool:
        return False

    async def _hold(self) -> None:
        self.write_started.set()
        if self.gate is not None:
            await self.gate.wait()

    @contextlib.asynccontextmanager
    async def _landing(self) -> AsyncIterator[None]:
        self._busy += 1
        self._idle.clear()
        try:
            await self._hold()
            yield
        finally:
            self._busy -= 1
            if not self._busy:
                self._idle.set()

    async def settled(self) -> None:
        """Return once no write or zero is in progress (held ones included)."""
        await self._idle.wait()

    async def read(self, offset: int, length: int) -> bytes:
        return await self._inner.read(offset, length)

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        async with self._landing():
            self.writes.append((offset, len(data)))
            await self._inner.write(offset, data)

    async def zero(self, offset: int, length: int, *, punch_hole: bool = False) -> None:
        async with self._landing():
            self.writes.append((offset, length))
            await self._inner.zero(offset, length, punch_hole=punch_hole)

    async def flush(self) -> None:
        await self._inner.flush()

    async def extents(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        return await self._inner.extents(offset, length)

    async def hash_blocks(self, offset: int, length: int, block: int) -> list[bytes]:
        return await self._inner.hash_blocks(offset, length, block)

    async def close(self) -> None:
        """Connections come and go; the file stays open until the volume is unserved."""

    def chunks_written(self, chunk_size: int) -> set[int]:
        return {
            index
            for offset, length in self.writes
            for index in range(offset // chunk_size, (offset + length - 1) // chunk_size + 1)
        }


@dataclass
class ServedVolume:
    path: Path
    backend: GatedVolume
    server: NbdServer

    @property
    def target(self) -> VolumeTarget:
        return VolumeTarget(self.server.address, EXPORT)

    def read(self) -> bytes:
        return self.path.read_bytes()


@asynccontextmanager
async def served_volume(path: Path, bulk_copy: bytes | None) -> AsyncIterator[ServedVolume]:
    """``bulk_copy`` written sparse to ``path`` (None: the file is there already, the bulk
    copy made it), exported read-write as ``volume``."""
    if bulk_copy is not None:
        write_sparse(path, bulk_copy)
    inner = FileBackend.open(path)
    backend = GatedVolume(inner)
    server = NbdServer()
    server.add_export(EXPORT, backend)
    await server.start()
    try:
        yield ServedVolume(path, backend, server)
    finally:
        await server.stop()
        await inner.close()
