"""An asyncio NBD server exporting Ferry backends over TCP (loopback) or a unix socket.

Usage::

    async with NbdServer({"disk": backend}) as server:     # 127.0.0.1, a free port
        url = server.url("disk")                            # nbd://127.0.0.1:PORT/disk

Exports can be added and removed while the server runs; removing one stops
new connections to it, connections already open keep their backend. Each
connection runs in its own task: whatever goes wrong on it (a peer breaking
the protocol, a dropped link, a failing backend) closes that connection and
is logged, never more. ``stop`` stops accepting, lets requests in flight
finish (bounded), then closes every connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
from collections.abc import Mapping
from types import TracebackType
from typing import Self

import structlog

from appliance.datapath.buffers import BufferPool
from appliance.datapath.nbd import protocol as p
from appliance.datapath.nbd.channel import (
    Channel,
    NbdAddress,
    TcpAddress,
    UnixAddress,
    nbd_url,
)
from appliance.datapath.nbd.server_handshake import Export, ServerHandshake
from appliance.datapath.nbd.transmission import ServerConnection
from appliance.errors import ConnectionDropped, NbdProtocolError
from appliance.storage.backend import Backend

log = structlog.get_logger(__name__)

DEFAULT_MAX_INFLIGHT = 16
HANDSHAKE_TIMEOUT = 30.0


class NbdServer:
    def __init__(
        self,
        exports: Mapping[str, Backend] | None = None,
        *,
        address: NbdAddress | None = None,
        max_block: int = p.DEFAULT_MAX_BLOCK,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
    ) -> None:
        self._requested = address or TcpAddress("127.0.0.1", 0)
        self._bound: NbdAddress | None = None
        self._max_block = max_block
        self._max_inflight = max_inflight
        self._exports: dict[str, Export] = {}
        for name, backend in (exports or {}).items():
            self.add_export(name, backend)
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._connections: set[asyncio.Task[None]] = set()
        # One pool for every connection: idle payload buffers stay bounded per server,
        # not per client.
        self._buffers = BufferPool()

    @property
    def address(self) -> NbdAddress:
        """The address clients connect to (with the real port once started)."""
        return self._bound or self._requested

    @property
    def port(self) -> int:
        if not isinstance(self.address, TcpAddress):
            raise ValueError(f"{self.address} is not a TCP address")
        return self.address.port

    @property
    def exports(self) -> list[str]:
        return sorted(self._exports)

    @property
    def connections(self) -> int:
        return len(self._connections)

    def url(self, export: str) -> str:
        return nbd_url(self.address, export)

    def add_export(self, name: str, backend: Backend, *, readonly: bool = False) -> None:
        """Export ``backend`` as ``name``; read-only if asked or if the backend is."""
        if len(name.encode()) > p.MAX_STRING:
            raise ValueError(f"export name of {len(name.encode())} bytes is too long")
        self._exports[name] = Export(name, backend, readonly or backend.readonly)

    def remove_export(self, name: str) -> None:
        self._exports.pop(name, None)

    async def start(self) -> None:
        if self._listener is not None:
            raise RuntimeError("NBD server already started")
        self._listener, self._bound = _listen(self._requested)
        self._accepting = asyncio.create_task(self._accept_loop())
        log.info("nbd server listening", address=str(self._bound), exports=self.exports)

    async def stop(self) -> None:
        if self._listener is None:
            return
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        self._listener.close()
        self._listener = None
        if isinstance(self._bound, UnixAddress):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._bound.path)
        connections = set(self._connections)
        for task in connections:
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
        log.info("nbd server stopped", address=str(self._bound))

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

    async def _accept_loop(self) -> None:
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, peer = await loop.sock_accept(self._listener)
            except OSError as exc:
                # Out of descriptors, most likely: back off instead of spinning.
                log.warning("nbd accept failed", error=repr(exc))
                await asyncio.sleep(0.5)
                continue
            name = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else f"unix:{self.address}"
            task = asyncio.create_task(self._serve(sock, name))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _serve(self, sock: socket.socket, peer: str) -> None:
        channel = Channel(sock, peer)
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                handshake = ServerHandshake(
                    channel, self._exports.get, lambda: self.exports, self._max_block
                )
                session = await handshake.run()
            if session is None:
                return
            connection = ServerConnection(
                channel,
                session,
                max_block=self._max_block,
                max_inflight=self._max_inflight,
                buffers=self._buffers,
            )
            await connection.serve()
        except ConnectionDropped:
            pass
        except (NbdProtocolError, TimeoutError) as exc:
            log.info("nbd connection closed on bad input", peer=peer, error=str(exc))
        except Exception:
            log.exception("nbd connection failed", peer=peer)
        finally:
            channel.close()


def _listen(address: NbdAddress) -> tuple[socket.socket, NbdAddress]:
    if isinstance(address, TcpAddress):
        sock = socket.create_server((address.host, address.port), backlog=64)
        host, port = sock.getsockname()[:2]
        bound: NbdAddress = TcpAddress(str(host), int(port))
    else:
        _remove_stale_socket(address)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(address.path))
            sock.listen(64)
        except BaseException:
            sock.close()
            raise
        bound = address
    sock.setblocking(False)
    return sock, bound


def _remove_stale_socket(address: UnixAddress) -> None:
    """A socket file left by a dead server would make bind fail; other files are kept."""
    try:
        mode = os.stat(address.path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(f"{address.path} exists and is not a socket")
    os.unlink(address.path)
