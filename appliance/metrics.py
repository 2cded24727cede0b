"""A Prometheus scrape endpoint on the event loop: ``GET /metrics`` on a HOST:PORT.

Each process makes its own :class:`CollectorRegistry` (never the global one, so
tests run several in one process) and registers collectors that read the live
figures when scraped. The endpoint runs on the process's own loop, so a
collector reads the figures with nothing mutating them meanwhile; ``refresh``
(if given) is awaited before each scrape for figures that need I/O to read.
The bind setting ``FERRY_METRICS_BIND`` is empty by default: no endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Self

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from appliance.logs import get_logger

log = get_logger(__name__)
MAX_REQUEST = 8192
READ_TIMEOUT_S = 10.0

Refresh = Callable[[], Awaitable[None]]


def split_bind(bind: str) -> tuple[str, int]:
    host, _, port = bind.rpartition(":")
    return host or "127.0.0.1", int(port)


class MetricsEndpoint:
    """``async with MetricsEndpoint(registry, "127.0.0.1:0") as endpoint: endpoint.address``."""

    def __init__(
        self, registry: CollectorRegistry, bind: str, refresh: Refresh | None = None
    ) -> None:
        self.registry = registry
        self._bind = bind
        self._refresh = refresh
        self._server: asyncio.Server | None = None
        self.address = ""
        self.scrapes = 0

    async def __aenter__(self) -> Self:
        host, port = split_bind(self._bind)
        self._server = await asyncio.start_server(self._serve, host, port)
        bound = self._server.sockets[0].getsockname()
        self.address = f"{bound[0]}:{bound[1]}"
        log.info("metrics endpoint listening", address=self.address)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            status, body, kind = await self._answer(head[:MAX_REQUEST])
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the scraper went away or sent no request: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _answer(self, head: bytes) -> tuple[str, bytes, str]:
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) < 2 or parts[0] != b"GET":
            return "405 Method Not Allowed", b"GET only\n", "text/plain"
        if parts[1].split(b"?", 1)[0] not in (b"/metrics", b"/"):
            return "404 Not Found", b"see /metrics\n", "text/plain"
        if self._refresh is not None:
            await self._refresh()
        self.scrapes += 1
        return "200 OK", generate_latest(self.registry), CONTENT_TYPE_LATEST
