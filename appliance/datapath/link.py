"""Optional zstd on the WAN link: a relay at each end that compresses what crosses it.

    # cloud side: the cache dials this local address instead of on-prem's
    async with ZstdRelay(TcpAddress("127.0.0.1", 0), onprem_zstd, accepts="plain") as out:
        upstream = out.address
    # on-prem side: compressed connections in, plain ones to the NBD server
    async with ZstdRelay(bind, nbd_server, accepts="zstd") as inbound: ...

Each relay accepts connections on ``listen`` and opens one to ``forward`` per
connection. The side facing the WAN carries one zstd frame per direction
(streaming): each burst read from the plain side is compressed and flushed
as a whole block at once, so a request or reply is never held back waiting
for more data, and the compressor keeps its window across bursts (a
repeated pattern costs little the second time). Whatever runs on top (NBD
between the cache and the I/O manager: misses, epoch shipping) sees a plain
byte stream and is unchanged; its own checks (chunk hashes) still hold end
to end. Both ends must agree: a plain peer on the compressed side sees
garbage and drops the connection.

Counters add up over every connection: ``plain_bytes`` (what the
applications sent, both ways) and ``wire_bytes`` (what crossed the WAN
side, both ways).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import TracebackType
from typing import Literal, Self

import structlog
import zstandard

from appliance.datapath.nbd.channel import TcpAddress

log = structlog.get_logger(__name__)

READ_SIZE = 256 * 1024
DEFAULT_LEVEL = 3
STOP_TIMEOUT = 10.0

Accepts = Literal["plain", "zstd"]


class ZstdRelay:
    def __init__(
        self,
        listen: TcpAddress,
        forward: TcpAddress,
        *,
        accepts: Accepts,
        level: int = DEFAULT_LEVEL,
    ) -> None:
        self._listen = listen
        self._forward = forward
        self._accepts = accepts
        self._level = level
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0
        self.connections = 0
        self.plain_bytes = 0
        self.wire_bytes = 0

    @property
    def address(self) -> TcpAddress:
        """Where to connect (the bound port when ``listen`` asked for port 0)."""
        return TcpAddress(self._listen.host, self.port)

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, self._listen.host, self._listen.port
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        # Cut connections end their handlers; a handler cancelled would be logged as an
        # error by the streams machinery, so they are cancelled only if they hang.
        handlers = set(self._handlers)
        if handlers:
            _, late = await asyncio.wait(handlers, timeout=STOP_TIMEOUT)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

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
        self._writers.add(writer)
        try:
            try:
                far_reader, far_writer = await asyncio.open_connection(
                    self._forward.host, self._forward.port
                )
            except OSError as exc:
                log.info(
                    "link relay cannot reach its peer", peer=str(self._forward), error=repr(exc)
                )
                return
            self._writers.add(far_writer)
            self.connections += 1
            try:
                await self._relay(reader, writer, far_reader, far_writer)
            finally:
                far_writer.transport.abort()
                self._writers.discard(far_writer)
        finally:
            writer.transport.abort()
            self._writers.discard(writer)
            self._handlers.discard(handler)

    async def _relay(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        far_reader: asyncio.StreamReader,
        far_writer: asyncio.StreamWriter,
    ) -> None:
        """Pump both ways until both ends closed theirs (an end of stream is passed on as
        one); a broken or damaged stream cuts both connections at once."""

        def cut() -> None:
            writer.transport.abort()
            far_writer.transport.abort()

        if self._accepts == "plain":
            up = self._compress(reader, far_writer, cut)
            down = self._decompress(far_reader, writer, cut)
        else:
            up = self._decompress(reader, far_writer, cut)
            down = self._compress(far_reader, writer, cut)
        await asyncio.gather(up, down)

    async def _compress(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, cut: Callable[[], None]
    ) -> None:
        compressor = zstandard.ZstdCompressor(level=self._level).compressobj()
        try:
            while data := await source.read(READ_SIZE):
                self.plain_bytes += len(data)
                out = compressor.compress(data)
                out += compressor.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
                self.wire_bytes += len(out)
                sink.write(out)
                await sink.drain()
            out = compressor.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH)
            self.wire_bytes += len(out)
            sink.write(out)
            await sink.drain()
            sink.write_eof()
        except (ConnectionError, OSError):
            cut()

    async def _decompress(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, cut: Callable[[], None]
    ) -> None:
        decompressor = zstandard.ZstdDecompressor().decompressobj()
        try:
            while data := await source.read(READ_SIZE):
                self.wire_bytes += len(data)
                out = decompressor.decompress(data)
                if out:
                    self.plain_bytes += len(out)
                    sink.write(out)
                    await sink.drain()
            sink.write_eof()
        except zstandard.ZstdError as exc:
            log.warning("link relay got a damaged stream", error=repr(exc))
            cut()
        except (ConnectionError, OSError):
            cut()
