"""A stand-in for the on-prem I/O manager: one raw image, its NBD export, staged epochs.

    async with LocalEpochSink(tmp_path / "onprem", image) as sink:
        sink.address, sink.export        # the current image, read-only over NBD
        # stage(): a disk-sized sparse file per epoch, exported read-write
        # commit(): each manifest chunk verified against the staged file, then
        #           applied to the image, fsynced; idempotent; stale tokens refused

Tests hold it with gates they control: ``stage_gate`` (shipping waits before
it may write the epoch), ``commit_gate`` (the commit waits before applying).
``proxy`` (a FaultProxy) makes staged exports reachable only through it.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from types import TracebackType
from typing import Self

from appliance.components.cache.shipping import EpochManifest, manifest_digest
from appliance.datapath.nbd.channel import NbdAddress, TcpAddress
from appliance.datapath.nbd.server import NbdServer
from appliance.errors import ChunkMismatch, StaleToken
from appliance.storage.extents import Extent
from appliance.storage.file import FileBackend
from appliance.storage.hashing import chunk_hash
from tests.support.faultproxy import FaultProxy

CURRENT = "current"


class CountedBackend:
    """The current image as served: counts reads, and holds them at ``gate`` when set."""

    def __init__(self, inner: FileBackend) -> None:
        self._inner = inner
        self.reads = 0
        self.read_started = asyncio.Event()
        self.gate: asyncio.Event | None = None

    @property
    def name(self) -> str:
        return self._inner.name

    @property
    def size(self) -> int:
        return self._inner.size

    @property
    def readonly(self) -> bool:
        return True

    async def read(self, offset: int, length: int) -> bytes:
        self.reads += 1
        self.read_started.set()
        if self.gate is not None:
            await self.gate.wait()
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
        await self._inner.close()


class LocalEpochSink:
    def __init__(self, directory: Path, image: Path) -> None:
        self._dir = directory
        self.image = image
        self.size = image.stat().st_size
        self.server = NbdServer()
        self.proxy: FaultProxy | None = None
        self.committed: dict[str, int] = {}
        self.tokens: dict[str, int] = {}
        self.commits: list[tuple[str, int]] = []
        self.stage_gate: asyncio.Event | None = None
        self.commit_gate: asyncio.Event | None = None
        self.staged = asyncio.Event()
        """Set each time an epoch is staged (tests clear it)."""
        self._backends: list[FileBackend] = []

    @property
    def address(self) -> NbdAddress:
        if self.proxy is not None:
            return TcpAddress("127.0.0.1", self.proxy.port)
        return self.server.address

    export = CURRENT

    async def __aenter__(self) -> Self:
        self._dir.mkdir(parents=True, exist_ok=True)
        current = FileBackend.open(self.image, readonly=True)
        self._backends.append(current)
        self.current = CountedBackend(current)
        self.server.add_export(CURRENT, self.current)
        await self.server.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.server.stop()
        for backend in self._backends:
            await backend.close()

    def read_image(self) -> bytes:
        return self.image.read_bytes()

    def _check(self, disk_id: str, token: int) -> None:
        highest = self.tokens.get(disk_id, 0)
        if token < highest:
            raise StaleToken(disk_id, token, highest)
        self.tokens[disk_id] = token

    def _staging(self, disk_id: str, epoch: int) -> Path:
        return self._dir / f"{disk_id}.{epoch}.staging"

    async def stage(self, disk_id: str, epoch: int, token: int) -> tuple[NbdAddress, str]:
        self._check(disk_id, token)
        self.staged.set()
        if self.stage_gate is not None:
            await self.stage_gate.wait()
        name = f"stage-{disk_id}-{epoch}"
        if name not in self.server.exports:
            backend = FileBackend.create(self._staging(disk_id, epoch), self.size, exist_ok=True)
            self._backends.append(backend)
            self.server.add_export(name, backend)
        return self.address, name

    async def commit(self, disk_id: str, epoch: int, token: int, manifest: EpochManifest) -> None:
        self._check(disk_id, token)
        if self.commit_gate is not None:
            await self.commit_gate.wait()
        if epoch <= self.committed.get(disk_id, 0):
            return  # replayed commit: already applied
        if manifest_digest(manifest.entries) != manifest.digest:
            raise ChunkMismatch(
                0, 0, manifest.digest.hex(), manifest_digest(manifest.entries).hex()
            )
        staged = self._staging(disk_id, epoch).read_bytes() if manifest.entries else b""
        for entry in manifest.entries:
            piece = staged[entry.offset : entry.offset + entry.length]
            if chunk_hash(piece) != entry.digest:
                found = chunk_hash(piece).hex()
                raise ChunkMismatch(entry.offset, entry.length, entry.digest.hex(), found)
        fd = os.open(self.image, os.O_WRONLY)
        try:
            for entry in manifest.entries:
                os.pwrite(fd, staged[entry.offset : entry.offset + entry.length], entry.offset)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.committed[disk_id] = epoch
        self.commits.append((disk_id, epoch))
