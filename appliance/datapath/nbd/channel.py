"""A non-blocking stream socket with exact reads, gathered writes and byte counters.

Both NBD ends use it. Small reads (headers) come through a read-ahead
buffer; large ones (payloads) are received straight into the caller's
buffer, so a payload is copied once, by the kernel. Writes go out with
``sendmsg`` (header and payload in one call, no join), one writer at a time.
A failure of the socket is raised as ``ConnectionDropped``; a write
interrupted half-way shuts the socket down, since the stream is then garbage.
Payload buffers come from a ``BufferPool`` (:mod:`appliance.datapath.buffers`).

Rule for users: wake every task blocked on the socket (``shutdown``) or
cancel it before ``close``; asyncio must not wait on a closed descriptor.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from appliance.errors import ConnectionDropped

READ_AHEAD = 128 * 1024
UNIX_SOCKET_BUFFER = 4 * 1024 * 1024

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class TcpAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class UnixAddress:
    path: Path

    def __str__(self) -> str:
        return f"unix:{self.path}"


NbdAddress = TcpAddress | UnixAddress


def nbd_url(address: NbdAddress, export: str) -> str:
    """The URL qemu tools and libnbd accept for ``export`` at ``address``."""
    if isinstance(address, TcpAddress):
        return f"nbd://{address.host}:{address.port}/{quote(export)}"
    return f"nbd+unix:///{quote(export)}?socket={quote(str(address.path))}"


def tune_socket(sock: socket.socket) -> None:
    """No Nagle delay on TCP; bigger buffers on unix sockets (TCP autotunes its own)."""
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    elif sock.family == socket.AF_UNIX:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UNIX_SOCKET_BUFFER)


class Channel:
    def __init__(self, sock: socket.socket, peer: str) -> None:
        tune_socket(sock)
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray(READ_AHEAD)
        self._view = memoryview(self._buffer)
        self._start = 0
        self._end = 0
        self._send_lock = asyncio.Lock()
        self._closed = False
        self.peer = peer
        self.bytes_sent = 0
        self.bytes_received = 0

    @property
    def closed(self) -> bool:
        return self._closed

    async def read_exactly(self, length: int) -> bytes:
        """``length`` bytes; meant for headers and other small fields."""
        if length > len(self._buffer):
            out = bytearray(length)
            await self.read_into(memoryview(out))
            return bytes(out)
        while self._end - self._start < length:
            if self._start:
                pending = self._end - self._start
                self._view[:pending] = self._view[self._start : self._end]
                self._start, self._end = 0, pending
            self._end += await self._recv_into(self._view[self._end :])
        data = bytes(self._view[self._start : self._start + length])
        self._consume(length)
        return data

    @property
    def buffered(self) -> int:
        """Bytes received and not yet read (in the read-ahead buffer)."""
        return self._end - self._start

    def peek(self, length: int) -> memoryview | None:
        """The next ``length`` bytes if all are buffered, without consuming them, else None.

        The view is valid until the next read or :meth:`skip`; use it at once."""
        if self._end - self._start < length:
            return None
        return self._view[self._start : self._start + length]

    def skip(self, length: int) -> None:
        """Consume ``length`` buffered bytes (after a :meth:`peek` that returned them)."""
        if length > self._end - self._start:
            raise ValueError(f"skip of {length} bytes, only {self._end - self._start} buffered")
        self._consume(length)

    async def read_into(self, view: memoryview) -> None:
        """Fill ``view`` entirely: first from the read-ahead buffer, then from the socket."""
        buffered = min(self._end - self._start, len(view))
        if buffered:
            view[:buffered] = self._view[self._start : self._start + buffered]
            self._consume(buffered)
        pos = buffered
        while pos < len(view):
            pos += await self._recv_into(view[pos:])

    async def discard(self, length: int) -> None:
        """Read and drop ``length`` bytes (a payload we refuse but must skip)."""
        scratch = memoryview(bytearray(min(length, 1024 * 1024)))
        while length:
            step = min(length, len(scratch))
            await self.read_into(scratch[:step])
            length -= step

    async def send(self, *buffers: Buffer) -> None:
        """Send all ``buffers`` in order, atomically with respect to other senders."""
        views = [memoryview(b).cast("B") for b in buffers if len(b)]
        async with self._send_lock:
            started = False
            try:
                while views:
                    sent = await self._sendmsg(views)
                    started = True
                    views = _advance(views, sent)
            except BaseException:
                if started and views:
                    self.shutdown()
                raise

    def shutdown(self) -> None:
        """Stop both directions now: blocked readers see end of stream, writers an error."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.shutdown()
            self._sock.close()

    def _consume(self, length: int) -> None:
        self._start += length
        if self._start == self._end:
            self._start = self._end = 0

    async def _recv_into(self, view: memoryview) -> int:
        if self._closed:
            raise ConnectionDropped(self.peer, "channel closed")
        try:
            received = await self._loop.sock_recv_into(self._sock, view)
        except OSError as exc:
            raise ConnectionDropped(self.peer, exc) from exc
        if received == 0:
            raise ConnectionDropped(self.peer, "end of stream")
        self.bytes_received += received
        return received

    async def _sendmsg(self, views: list[memoryview]) -> int:
        while True:
            if self._closed:
                raise ConnectionDropped(self.peer, "channel closed")
            try:
                sent = self._sock.sendmsg(views)
            except (BlockingIOError, InterruptedError):
                await self._writable()
                continue
            except OSError as exc:
                raise ConnectionDropped(self.peer, exc) from exc
            self.bytes_sent += sent
            return sent

    async def _writable(self) -> None:
        ready = self._loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        fd = self._sock.fileno()
        self._loop.add_writer(fd, wake)
        try:
            await ready
        finally:
            self._loop.remove_writer(fd)


def _advance(views: list[memoryview], sent: int) -> list[memoryview]:
    """What is left of ``views`` after ``sent`` bytes went out."""
    while sent and views:
        if sent >= len(views[0]):
            sent -= len(views[0])
            views = views[1:]
        else:
            views = [views[0][sent:], *views[1:]]
            sent = 0
    return views


async def connect(address: NbdAddress, connect_timeout: float) -> Channel:
    """A channel to ``address``; any failure to connect is a ``ConnectionDropped``."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(connect_timeout):
            if isinstance(address, UnixAddress):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                target: str | tuple[str, int] = str(address.path)
            else:
                infos = await loop.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
                family, _, _, _, sockaddr = infos[0]
                sock = socket.socket(family, socket.SOCK_STREAM)
                target = (str(sockaddr[0]), int(sockaddr[1]))
            try:
                sock.setblocking(False)
                await loop.sock_connect(sock, target)
            except BaseException:
                sock.close()
                raise
    except (OSError, TimeoutError) as exc:
        raise ConnectionDropped(str(address), exc) from exc
    return Channel(sock, str(address))
