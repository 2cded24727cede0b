"""A FaultProxy that can also damage one byte going upstream (client to server), once.

    proxy.corrupt_once_after(100_000)   # the 100 001st byte from now is flipped

It also closes a client's connection when the proxy stops while that
connection is still being forwarded upstream (the base class leaves it to the
garbage collector, which warns).
"""

from __future__ import annotations

import asyncio
from typing import cast

from tests.support.faultproxy import FaultProxy, _Link


class _DamagingReader:
    def __init__(self, inner: asyncio.StreamReader, proxy: CorruptingProxy) -> None:
        self._inner = inner
        self._proxy = proxy

    async def read(self, n: int = -1) -> bytes:
        return self._proxy.damage(await self._inner.read(n))


class CorruptingProxy(FaultProxy):
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        super().__init__(upstream_host, upstream_port)
        self._corrupt_at: int | None = None
        self.corrupted = 0

    def corrupt_once_after(self, nbytes: int) -> None:
        self._corrupt_at = nbytes

    def damage(self, data: bytes) -> bytes:
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

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await super()._accept(reader, writer)
        except asyncio.CancelledError:
            writer.transport.abort()
            raise

    async def _pump(
        self,
        link: _Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        upstream: bool,
    ) -> None:
        if upstream:
            reader = cast(asyncio.StreamReader, _DamagingReader(reader, self))
        await super()._pump(link, reader, writer, upstream=upstream)
