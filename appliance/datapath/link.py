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

Whether the link works is :class:`LinkWatch`'s to say: the cloud cache probes
each on-prem address its disks read from (a new connection must bring the NBD
server's greeting within ``probe_s``), every ``interval_s``, and reports which
are down and since when in its heartbeat (``wan_link``). A blackholed link
(packets dropped, nothing refused) hangs a connection rather than failing it,
so a probe that times out counts as down, like one refused. What uses the link
meanwhile (misses, epoch shipping) waits and retries at its own edge
(``components/cache/upstream.py``, ``shipping.py``); the control plane decides
from the report whether the link is degraded (down for less than
``wan_down_threshold_s``) or failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self

import structlog
import zstandard

from appliance.datapath.nbd import protocol
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


async def greeted(address: TcpAddress, timeout_s: float) -> str | None:
    """None when the NBD server at ``address`` sends its greeting within ``timeout_s``
    (connection included), else why not."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(address.host, address.port)
            greeting = await reader.readexactly(8)
    except TimeoutError:
        return f"no NBD greeting within {timeout_s:.1f}s"
    except (OSError, asyncio.IncompleteReadError) as error:
        return f"{type(error).__name__}: {error}"
    finally:
        if writer is not None:
            writer.transport.abort()
    if int.from_bytes(greeting, "big") != protocol.NBDMAGIC:
        return "not an NBD server"
    return None


@dataclass(slots=True)
class _Peer:
    users: set[str]
    down_since: float | None = None
    detail: str = ""


class LinkWatch:
    """The WAN link as the cloud cache sees it: each on-prem address in use, probed.

    ``use(user, address)`` / ``release(user)`` say which addresses are in use (a user
    is a disk); :meth:`run` probes them every ``interval_s``; :meth:`report` gives the
    heartbeat's ``wan_link`` figure: ``peers`` (addresses in use), ``down`` (address:
    ``{"down_s", "detail"}``, down since the first probe that failed after a success).
    """

    def __init__(
        self,
        *,
        interval_s: float,
        probe_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._interval_s = interval_s
        self._probe_s = probe_s
        self._clock = clock
        self._peers: dict[TcpAddress, _Peer] = {}
        self.probes = 0

    def use(self, user: str, address: TcpAddress) -> None:
        self.release(user)
        self._peers.setdefault(address, _Peer(set())).users.add(user)

    def release(self, user: str) -> None:
        for address, peer in list(self._peers.items()):
            peer.users.discard(user)
            if not peer.users:
                del self._peers[address]

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.probe()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self._interval_s)

    async def probe(self) -> None:
        """Probe every address in use once (side by side)."""
        addresses = list(self._peers)
        started = self._clock()
        answers = await asyncio.gather(*(greeted(a, self._probe_s) for a in addresses))
        self.probes += 1
        for address, why in zip(addresses, answers, strict=True):
            peer = self._peers.get(address)
            if peer is None:
                continue  # released meanwhile
            if why is None:
                if peer.down_since is not None:
                    log.info("wan link back", peer=str(address))
                peer.down_since, peer.detail = None, ""
            else:
                if peer.down_since is None:
                    log.warning("wan link down", peer=str(address), error=why)
                    peer.down_since = started
                peer.detail = why

    def report(self) -> dict[str, object]:
        now = self._clock()
        down = {
            str(address): {"down_s": round(now - peer.down_since, 3), "detail": peer.detail}
            for address, peer in self._peers.items()
            if peer.down_since is not None
        }
        return {"peers": sorted(map(str, self._peers)), "down": down}
