"""A FaultProxy whose link can also be blackholed: nothing crosses it, nothing is refused.

    async with BlackholeProxy("127.0.0.1", server.port) as wan:
        wan.blackhole()   # packets dropped: connections hang, new ones get no answer
        ...
        wan.heal()        # what was held goes through, as TCP's retransmissions would

While the link is blackholed, bytes read on either side are held (not lost: a
TCP stream over a link that drops packets delivers them once it is back), and
a new connection is accepted locally but gets nothing from the far side until
the link heals (a blackholed SYN). ``retarget`` points the proxy at another
upstream (the far end's port known only after the proxy had to exist).
"""

from __future__ import annotations

import asyncio
from typing import cast

from tests.support.faultproxy import FaultProxy, _Link


class _HeldReader:
    """Reads pass only while the link is up."""

    def __init__(self, inner: asyncio.StreamReader, proxy: BlackholeProxy) -> None:
        self._inner = inner
        self._proxy = proxy

    async def read(self, n: int = -1) -> bytes:
        data = await self._inner.read(n)
        await self._proxy.passing.wait()
        return data


class BlackholeProxy(FaultProxy):
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        super().__init__(upstream_host, upstream_port)
        self.passing = asyncio.Event()
        self.passing.set()
        self.blackholes = 0
        self.held_connections = 0
        """Connections accepted while the link was down (their far side waited)."""

    def retarget(self, host: str, port: int) -> None:
        self._upstream = (host, port)

    def blackhole(self) -> None:
        self.blackholes += 1
        self.passing.clear()

    def heal(self) -> None:
        self.passing.set()

    @property
    def down(self) -> bool:
        return not self.passing.is_set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)  # a stop cancels it while it waits for the link
        if not self.passing.is_set():
            self.held_connections += 1
        try:
            await self.passing.wait()
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
        held = cast(asyncio.StreamReader, _HeldReader(reader, self))
        await super()._pump(link, held, writer, upstream=upstream)
