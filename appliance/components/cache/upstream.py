"""The on-prem side of a cached disk: the I/O manager's *current* image, read over NBD.

The address comes in the open order; whatever lies between (the WAN link, a
fault-injecting proxy in tests) is transparent. A dropped link is retried
here, at the edge, every ``retry_delay_s`` until ``timeout_s`` has passed; so is
an export the server refuses (an I/O manager that restarted listens on its port
before it has reopened its disks).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog

from appliance.datapath.nbd.backend import NbdBackend
from appliance.datapath.nbd.channel import NbdAddress
from appliance.errors import NbdExportRefused, TransientError
from appliance.storage.extents import Extent

log = structlog.get_logger(__name__)

T = TypeVar("T")


class Upstream:
    def __init__(
        self, address: NbdAddress, export: str, *, retry_delay_s: float, timeout_s: float
    ) -> None:
        self.address = address
        self.export = export
        self._retry_delay_s = retry_delay_s
        self._timeout_s = timeout_s
        self._backend: NbdBackend | None = None
        self._connect_lock = asyncio.Lock()
        self.retrying = asyncio.Event()
        """Set at each failed attempt to reach on-prem (tests clear it)."""
        self.reads = 0
        """Read requests sent upstream (each miss is one)."""

    async def _connected(self) -> NbdBackend:
        async with self._connect_lock:
            if self._backend is None:
                self._backend = await NbdBackend.connect(self.address, self.export)
            return self._backend

    async def _retrying(self, call: Callable[[NbdBackend], Awaitable[T]]) -> T:
        deadline = time.monotonic() + self._timeout_s
        while True:
            try:
                return await call(await self._connected())
            except (TransientError, OSError, NbdExportRefused) as exc:
                self.retrying.set()
                if time.monotonic() >= deadline:
                    raise
                log.info("upstream unreachable; retrying", export=self.export, error=repr(exc))
                await asyncio.sleep(self._retry_delay_s)

    async def size(self) -> int:
        return await self._retrying(lambda backend: _size(backend))

    async def read(self, offset: int, length: int) -> bytes:
        async def once(backend: NbdBackend) -> bytes:
            self.reads += 1
            return await backend.read(offset, length)

        return await self._retrying(once)

    async def hash_blocks(self, offset: int, length: int, block: int) -> list[bytes] | None:
        """On-prem's hash of each ``block`` of a range, computed there (None: it cannot)."""
        return await self._retrying(lambda backend: backend.hash_blocks(offset, length, block))

    async def extents(self) -> list[Extent]:
        return await self._retrying(lambda backend: backend.extents(0, backend.size))

    async def close(self) -> None:
        if self._backend is not None:
            await self._backend.close()
            self._backend = None


async def _size(backend: NbdBackend) -> int:
    return backend.size
