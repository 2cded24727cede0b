"""The on-prem side of a cached disk: the I/O manager's *current* image, read over NBD.

The address comes in the open order; whatever lies between (the WAN link, a
fault-injecting proxy in tests) is transparent. A dropped link is retried
here, at the edge, every ``retry_delay_s``, and a hung one waited for, until
``timeout_s`` (the WAN threshold, ``wan_down_threshold_s``) has passed: a miss
stalls while the link is down for less than that, and fails after. So is an export
the server refuses (an I/O manager that restarted listens on its port before it has
reopened its disks).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog

from appliance.datapath.nbd.backend import NbdBackend
from appliance.datapath.nbd.channel import NbdAddress
from appliance.errors import LinkDown, NbdExportRefused, TransientError
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
        self._closing: set[asyncio.Task[None]] = set()
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
        """``call`` until it answers, for ``timeout_s`` at most (the WAN threshold): a
        dropped link is retried every ``retry_delay_s``, a hung one (a blackhole holds a
        request without an error) waits; past the deadline the connection, which may be
        wedged, is dropped and the error raised (the guest's read fails then, not before)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_s
        while True:
            backend: NbdBackend | None = None
            try:
                async with asyncio.timeout_at(deadline):
                    backend = await self._connected()
                    return await call(backend)
            except TimeoutError as exc:
                self.retrying.set()
                await self._drop(backend)
                cause = "no answer from on-prem"
                raise LinkDown(str(self.address), self._timeout_s, cause) from exc
            except (TransientError, OSError, NbdExportRefused) as exc:
                self.retrying.set()
                if loop.time() >= deadline:
                    raise LinkDown(str(self.address), self._timeout_s, exc) from exc
                log.info("upstream unreachable; retrying", export=self.export, error=repr(exc))
                await asyncio.sleep(min(self._retry_delay_s, max(0.0, deadline - loop.time())))
            except ValueError:
                if backend is None or backend is self._backend:
                    raise
                # The connection was dropped under this call (another call's deadline): again.

    async def _drop(self, backend: NbdBackend | None) -> None:
        """Let go of a connection that may be wedged; the next call opens a new one."""
        if backend is not None and backend is self._backend:
            self._backend = None
            # Closing waits (bounded) for the requests in flight on it: not here.
            task = asyncio.create_task(_close_quietly(backend))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

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
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


async def _close_quietly(backend: NbdBackend) -> None:
    with contextlib.suppress(Exception):
        await backend.close()


async def _size(backend: NbdBackend) -> int:
    return backend.size
