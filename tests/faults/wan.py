"""The WAN link between the cache and the on-prem I/O manager, with faults on demand.

A TCP proxy on loopback. The on-prem I/O manager of the fault suite reports this
proxy's address as its own (tests/faults/runtime.py: a NAT, in effect), so the
cache's misses and epoch shipping, and the appliance's link probe, all cross it.
Its upstream is looked up at each new connection (``resolve``), so a restarted
I/O manager is found wherever it listens.

* ``blackhole()`` / ``heal()``: nothing crosses in either direction; open
  connections stall (what a real blackhole does to TCP: retransmits, then
  delivery once the path is back) and new ones are refused (the listener is
  closed: a connect fails instead of timing out, which only makes failures seen
  sooner; a bound socket keeps the port ours meanwhile). ``heal`` listens again
  on the same port and lets the held bytes go.
* ``reset_mid_chunk(after, times)``: each connection is reset (both sides see
  an abort) once it forwarded ``after`` bytes from the cache towards on-prem;
  ``times`` resets, then the link heals itself. ``resets`` counts them and
  ``reset_done`` is set after the last.
* ``latency(mean_s, jitter_s)``: every segment arrives ``mean ± jitter``
  seconds after it left (uniform, seeded), in order per direction (a segment
  never overtakes the one before it, as on a TCP stream).
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

READ_SIZE = 64 * 1024
Resolve = Callable[[], Awaitable[tuple[str, int]]]


@dataclass(eq=False)
class _Link:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    sent_up: int = 0

    def cut(self) -> None:
        self.client.transport.abort()
        if self.upstream is not None:
            self.upstream.transport.abort()


@dataclass(eq=False)
class _DelayLine:
    """One direction of one connection: segments written in order at their due times."""

    writer: asyncio.StreamWriter
    queue: asyncio.Queue[tuple[float, bytes | None]] = field(default_factory=asyncio.Queue)
    last_due: float = 0.0

    async def deliver(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, data = await self.queue.get()
            if due > loop.time():
                await asyncio.sleep(due - loop.time())  # the link's own delay, not a wait
            if data is None:
                self.writer.transport.close()
                return
            self.writer.write(data)
            await self.writer.drain()


class WanLink:
    def __init__(self, resolve: Resolve, *, seed: int = 1) -> None:
        self._resolve = resolve
        self._server: asyncio.Server | None = None
        self._placeholder: socket.socket | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._open = asyncio.Event()
        self._open.set()
        self._reset_after: int | None = None
        self._resets_left = 0
        self._latency: tuple[float, float] | None = None
        self._random = random.Random(seed)
        self.reset_done = asyncio.Event()
        self.resets = 0
        self.connections = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        if self._placeholder is not None:
            self._placeholder.close()
            self._placeholder = None

    async def stop(self) -> None:
        self._open.set()
        await self._close_listener()
        if self._placeholder is not None:
            self._placeholder.close()
            self._placeholder = None
        for link in list(self._links):
            link.cut()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

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

    # -- faults -----------------------------------------------------------------------------------

    async def blackhole(self) -> None:
        self._open.clear()
        await self._close_listener()
        # Bound, not listening: connects are refused and no other socket can take the port.
        self._placeholder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._placeholder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._placeholder.bind(("127.0.0.1", self.port))

    async def heal(self) -> None:
        """The path is back: held bytes go, the listener is up again, no fault armed."""
        self._reset_after = None
        self._latency = None
        if self._server is None:
            await self.start()
        self._open.set()

    def reset_mid_chunk(self, after: int, times: int) -> None:
        self.reset_done.clear()
        self._reset_after = after
        self._resets_left = times
        for link in self._links:
            link.sent_up = 0

    def latency(self, mean_s: float, jitter_s: float) -> None:
        self._latency = (mean_s, jitter_s)

    # -- forwarding -------------------------------------------------------------------------------

    async def _close_listener(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def _spawn(self, coroutine: Awaitable[None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._tasks.add(handler)
        link = _Link(writer)
        self._links.add(link)
        try:
            await self._open.wait()
            host, port = await self._resolve()
            up_reader, up_writer = await asyncio.open_connection(host, port)
            link.upstream = up_writer
            self.connections += 1
            async with asyncio.TaskGroup() as group:
                group.create_task(self._pump(link, reader, up_writer, upstream=True))
                group.create_task(self._pump(link, up_reader, writer, upstream=False))
        except* (ConnectionError, OSError):
            pass
        finally:
            link.cut()
            self._links.discard(link)
            self._tasks.discard(handler)

    def _due(self, line: _DelayLine) -> float:
        now = asyncio.get_running_loop().time()
        if self._latency is None:
            due = now
        else:
            mean, jitter = self._latency
            due = now + max(0.0, self._random.uniform(mean - jitter, mean + jitter))
        line.last_due = max(line.last_due, due)
        return line.last_due

    async def _pump(
        self,
        link: _Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        upstream: bool,
    ) -> None:
        line = _DelayLine(writer)
        delivering = self._spawn(line.deliver())
        try:
            while data := await reader.read(READ_SIZE):
                await self._open.wait()
                if upstream and self._should_reset(link, len(data)):
                    return
                if upstream:
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
                line.queue.put_nowait((self._due(line), data))
            line.queue.put_nowait((self._due(line), None))
            await delivering
        finally:
            delivering.cancel()

    def _should_reset(self, link: _Link, size: int) -> bool:
        """Count bytes towards on-prem; cut the link (and say so) once the armed reset is due."""
        if self._reset_after is None:
            return False
        link.sent_up += size
        if link.sent_up < self._reset_after:
            return False
        self.resets += 1
        self._resets_left -= 1
        if self._resets_left <= 0:
            self._reset_after = None
            self.reset_done.set()
        link.cut()
        return True
