"""A fault-injecting TCP proxy on loopback: forwards bytes, counts them, cuts the link on demand.

    async with FaultProxy("127.0.0.1", server.port) as proxy:
        backend = await NbdBackend.connect(TcpAddress("127.0.0.1", proxy.port))
        proxy.drop_after(5 << 20)   # cut every open connection 5 MiB from now (once)
        proxy.drop_every(64 << 10)  # or: each connection dies after 64 KiB
        proxy.drop_now()

Cutting a connection aborts both sides (the peers see a reset, not a clean
close). Counters add up over every connection: ``bytes_up`` (client to
server), ``bytes_down``, ``connections``, ``drops``.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

READ_SIZE = 256 * 1024


@dataclass(eq=False)
class _Link:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    forwarded: int = 0
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def cut(self) -> None:
        self.client.transport.abort()
        self.upstream.transport.abort()


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._budget: int | None = None  # one-shot: bytes left before every link is cut
        self._per_link: int | None = None  # every link is cut after this many bytes
        self.bytes_up = 0
        self.bytes_down = 0
        self.connections = 0
        self.drops = 0
        self.port = 0

    def drop_after(self, nbytes: int) -> None:
        """Cut every open connection once ``nbytes`` more bytes went through (either way)."""
        self._budget = nbytes

    def drop_every(self, nbytes: int | None) -> None:
        """Cut each connection after it forwarded ``nbytes``; None heals the link."""
        self._per_link = nbytes

    def drop_now(self) -> None:
        links = list(self._links)
        self.drops += len(links)
        for link in links:
            link.cut()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for link in list(self._links):
            link.cut()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.transport.abort()
            self._handlers.discard(handler)
            return
        self.connections += 1
        link = _Link(writer, up_writer)
        self._links.add(link)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._pump(link, reader, up_writer, upstream=True))
                group.create_task(self._pump(link, up_reader, writer, upstream=False))
        except* (ConnectionError, OSError):
            pass
        finally:
            link.cut()
            self._links.discard(link)
            self._handlers.discard(handler)

    def _allowance(self, link: _Link, wanted: int) -> int:
        """How many of ``wanted`` bytes may pass before a fault fires."""
        allowed = wanted
        if self._budget is not None:
            allowed = min(allowed, self._budget)
        if self._per_link is not None:
            allowed = min(allowed, max(self._per_link - link.forwarded, 0))
        return allowed

    async def _pump(
        self,
        link: _Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        upstream: bool,
    ) -> None:
        while data := await reader.read(READ_SIZE):
            allowed = self._allowance(link, len(data))
            if allowed:
                writer.write(data[:allowed])
                link.forwarded += allowed
                if upstream:
                    self.bytes_up += allowed
                else:
                    self.bytes_down += allowed
                if self._budget is not None:
                    self._budget -= allowed
            if allowed < len(data) or self._budget == 0:
                self._fire(link)
                return
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        writer.transport.close()

    def _fire(self, link: _Link) -> None:
        if self._budget is not None and self._budget <= 0:
            self._budget = None
            self.drop_now()
        else:
            self.drops += 1
            link.cut()
