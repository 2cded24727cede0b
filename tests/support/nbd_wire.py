"""A hand-rolled NBD peer speaking raw bytes, for tests that check what a server sends."""

from __future__ import annotations

import asyncio
import struct

from appliance.datapath.nbd import protocol as p
from appliance.datapath.nbd.channel import UnixAddress
from appliance.datapath.nbd.server import NbdServer

TIMEOUT = 5.0


class Wire:
    """Raw NBD bytes over a stream; every read times out rather than hang a test."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, server: NbdServer) -> Wire:
        if isinstance(server.address, UnixAddress):
            reader, writer = await asyncio.open_unix_connection(str(server.address.path))
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        return cls(reader, writer)

    async def recv(self, length: int) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(length), TIMEOUT)

    async def send(self, *data: bytes) -> None:
        self.writer.write(b"".join(data))
        await self.writer.drain()

    async def closed_by_server(self) -> bool:
        """True when the server hung up (end of stream) without sending anything more."""
        try:
            return await asyncio.wait_for(self.reader.read(1), TIMEOUT) == b""
        except ConnectionResetError:
            return True

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, BrokenPipeError):
            pass

    async def greet(self, client_flags: int = 3) -> int:
        magic, opt_magic, flags = p.SERVER_GREETING.unpack(await self.recv(18))
        assert (magic, opt_magic) == (p.NBDMAGIC, p.IHAVEOPT)
        await self.send(p.CLIENT_FLAGS.pack(client_flags))
        return int(flags)

    async def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option; collect replies up to the final one (ACK or an error)."""
        await self.send(p.pack_option(option, data))
        replies = []
        while True:
            magic, replied, kind, length = p.OPTION_REPLY_HEADER.unpack(await self.recv(20))
            assert (magic, replied) == (p.OPTION_REPLY_MAGIC, option)
            replies.append((kind, await self.recv(length)))
            if kind == p.Reply.ACK or kind & p.REPLY_ERROR_BIT:
                return replies

    async def go(self, export: str = "disk", contexts: tuple[str, ...] = ()) -> tuple[int, int]:
        """Structured replies, the given contexts, then GO; returns (size, flags)."""
        assert (await self.option(p.Option.STRUCTURED_REPLY))[-1][0] == p.Reply.ACK
        if contexts:
            query = p.pack_meta_context_query(export, list(contexts))
            await self.option(p.Option.SET_META_CONTEXT, query)
        replies = await self.option(p.Option.GO, p.pack_info_request(export, []))
        assert replies[-1][0] == p.Reply.ACK, replies
        info = next(data for kind, data in replies if data[:2] == b"\0\0")
        _, size, flags = p.INFO_EXPORT.unpack(info)
        return size, flags

    async def request(
        self, command: int, offset: int, length: int, *, flags: int = 0, handle: int = 1
    ) -> None:
        await self.send(p.pack_request(command, handle, offset, length, flags))

    async def simple_reply(self) -> tuple[int, int]:
        magic, error, handle = p.SIMPLE_REPLY.unpack(await self.recv(16))
        assert magic == p.SIMPLE_REPLY_MAGIC
        return error, handle

    async def chunk(self) -> tuple[int, int, int, bytes]:
        magic, flags, kind, handle, length = p.STRUCTURED_REPLY.unpack(await self.recv(20))
        assert magic == p.STRUCTURED_REPLY_MAGIC
        return flags, kind, handle, await self.recv(length)

    async def error_of(self) -> int:
        """The error value of the next reply, simple or structured."""
        (magic,) = struct.unpack(">I", await self.recv(4))
        if magic == p.SIMPLE_REPLY_MAGIC:
            error, _ = p.SIMPLE_REPLY_TAIL.unpack(await self.recv(12))
            return int(error)
        flags, kind, _, length = p.STRUCTURED_REPLY_TAIL.unpack(await self.recv(16))
        payload = await self.recv(length)
        assert flags & p.ReplyFlag.DONE and kind == p.ReplyType.ERROR
        return int(p.ERROR_HEADER.unpack_from(payload)[0])
