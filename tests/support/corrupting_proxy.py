"""A FaultProxy that can also damage one byte going upstream (client to server), once.

proxy.corrupt_once_after(100_000)   # the 100 001st byte from now is flipped
"""

from __future__ import annotations

import asyncio
import contextlib

from tests.support.faultproxy import FaultProxy, _Link


class CorruptingProxy(FaultProxy):
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        super().__init__(upstream_host, upstream_port)
        self._corrupt_at: int | None = None
        self.corrupted = 0

    def corrupt_once_after(self, nbytes: int) -> None:
        self._corrupt_at = nbytes

    def _damage(self, data: bytes) -> bytes:
        at = self._corrupt_at
        if at is None:
            return data
        if at >= len(data):
            self._corrupt_at = at - len(data)
            return data
        self._corrupt_at = None
        self.corrupted += 1
        damaged = bytearray(data)
        damaged[at] ^= 0x5A
        return bytes(damaged)

    async def _pump(
        self,
        link: _Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        upstream: bool,
    ) -> None:
        if not upstream:
            await super()._pump(link, reader, writer, upstream=upstream)
            return
        while data := await reader.read(64 * 1024):
            writer.write(self._damage(data))
            self.bytes_up += len(data)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        writer.transport.close()
