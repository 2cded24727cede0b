"""The NBD client and NbdBackend against our server, a link that drops, and a lying server."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from appliance.datapath.nbd import protocol as p
from appliance.datapath.nbd.backend import NbdBackend
from appliance.datapath.nbd.channel import TcpAddress
from appliance.datapath.nbd.client import NbdClient
from appliance.datapath.nbd.server import NbdServer
from appliance.errors import ConnectionDropped, NbdCommandError, NbdProtocolError
from appliance.storage.extents import Extent
from appliance.storage.hashing import chunk_hash, zero_hash
from appliance.storage.memory import MemoryBackend
from tests.support.gate import Gate

MiB = 1024 * 1024
SIZE = 8 * MiB
MAX_BLOCK = 256 * 1024


class DroppingProxy:
    """A TCP relay to the server whose open connections the test can cut at will."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> TcpAddress:
        assert self.server is not None
        return TcpAddress("127.0.0.1", self.server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers += [writer, up_writer]
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(source, sink))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    @staticmethod
    async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        sink.close()

    def drop(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()

    async def stop(self) -> None:
        self.drop()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest.fixture
async def disk() -> MemoryBackend:
    backend = MemoryBackend(SIZE)
    await backend.write(MiB, os.urandom(MiB))
    return backend


@pytest.fixture
async def server(disk: MemoryBackend) -> AsyncIterator[NbdServer]:
    async with NbdServer({"disk": disk}, max_block=MAX_BLOCK) as running:
        yield running


@pytest.fixture
async def backend(server: NbdServer) -> AsyncIterator[NbdBackend]:
    async with await NbdBackend.connect(server.address, "disk") as connected:
        yield connected


@pytest.fixture
async def proxy(server: NbdServer) -> AsyncIterator[DroppingProxy]:
    relay = DroppingProxy(server.port)
    await relay.start()
    yield relay
    await relay.stop()


async def test_client_negotiates_everything_our_server_offers(server: NbdServer) -> None:
    async with await NbdClient.connect(server.address, "disk") as client:
        info = client.info
        assert info.size == SIZE and info.structured
        assert info.max_block == MAX_BLOCK and info.min_block == 1
        assert info.allocation_context is not None and client.can_checksum
        assert not info.readonly and info.has(p.TransmissionFlag.CAN_MULTI_CONN)


async def test_requests_larger_than_the_max_block_are_split(
    backend: NbdBackend, disk: MemoryBackend
) -> None:
    data = os.urandom(3 * MiB + 123)
    await backend.write(77, data)
    assert await disk.read(77, len(data)) == data
    assert await backend.read(77, len(data)) == data
    await backend.zero(100, 2 * MiB, punch_hole=True)
    assert await disk.read(100, 2 * MiB) == bytes(2 * MiB)


async def test_many_requests_in_flight_on_one_connection(
    backend: NbdBackend, disk: MemoryBackend
) -> None:
    pieces = {offset: os.urandom(4096 + offset % 7) for offset in range(0, SIZE, 64 * 1024)}
    await asyncio.gather(*(backend.write(offset, data) for offset, data in pieces.items()))
    results = await asyncio.gather(*(backend.read(o, len(d)) for o, d in pieces.items()))
    assert results == list(pieces.values())


async def test_extents_are_paged_to_the_end_and_merged(
    server: NbdServer,
) -> None:
    fragmented = MemoryBackend(SIZE)
    for offset in range(0, SIZE, 8192):
        await fragmented.write(offset, b"x")
    server.add_export("fragmented", fragmented)
    async with await NbdBackend.connect(server.address, "fragmented") as backend:
        extents = await backend.extents()
        assert extents == await fragmented.extents()
        assert len(extents) == SIZE // 4096
        assert await backend.extents(4000, 200) == [Extent(4000, 96), Extent(4096, 104, True, True)]


async def test_extents_show_holes_and_zeroes(backend: NbdBackend, disk: MemoryBackend) -> None:
    await disk.zero(4 * MiB, MiB)
    assert await backend.extents() == await disk.extents()
    assert Extent(4 * MiB, MiB, zero=True) in await backend.extents()


async def test_checksum_matches_the_hash_of_the_bytes(
    backend: NbdBackend, disk: MemoryBackend
) -> None:
    assert await backend.checksum(MiB - 5, 200_000) == chunk_hash(await disk.read(MiB - 5, 200_000))
    assert await backend.checksum(6 * MiB, MAX_BLOCK) == zero_hash(MAX_BLOCK)
    with pytest.raises(ValueError):
        await backend.checksum(0, MAX_BLOCK + 1)


async def test_hash_blocks_asks_in_pieces_of_the_maximum_block(
    backend: NbdBackend, disk: MemoryBackend
) -> None:
    start, length, block = MiB - 8192, 3 * MAX_BLOCK + 5000, 64 * 1024  # past max_block
    data = await disk.read(start, length)
    expected = [chunk_hash(data[at : at + block]) for at in range(0, length, block)]
    assert await backend.hash_blocks(start, length, block) == expected
    # Sizes the extension cannot ask for: the caller hashes by other means.
    assert await backend.hash_blocks(0, MiB, 48 * 1024) is None
    assert await backend.hash_blocks(0, MiB, 2 * MAX_BLOCK) is None


async def test_write_verified_returns_the_hash_of_what_the_server_received(
    backend: NbdBackend, disk: MemoryBackend
) -> None:
    data = os.urandom(MAX_BLOCK)
    assert await backend.write_verified(MiB + 3, data) == chunk_hash(data)
    assert await disk.read(MiB + 3, len(data)) == data
    # More than one request: written all the same, but no single digest covers it.
    bigger = os.urandom(MAX_BLOCK + 1)
    assert await backend.write_verified(0, bigger) is None
    assert await disk.read(0, len(bigger)) == bigger


async def test_hashed_writes_in_flight_each_get_their_own_digest(
    backend: NbdBackend, disk: MemoryBackend
) -> None:
    pieces = {offset: os.urandom(10_000 + offset % 13) for offset in range(0, SIZE, 128 * 1024)}
    digests = await asyncio.gather(*(backend.write_verified(o, d) for o, d in pieces.items()))
    assert digests == [chunk_hash(data) for data in pieces.values()]


async def test_errors_from_the_server_raise_nbd_command_error(server: NbdServer) -> None:
    async with await NbdClient.connect(server.address, "disk") as client:
        with pytest.raises(NbdCommandError) as caught:
            await client.read(SIZE - 1, 2)
        assert caught.value.errno == p.Errno.EINVAL and caught.value.command == "READ"
        assert await client.read(0, 1) == b"\0"


async def test_readonly_export_is_readonly_through_the_backend(server: NbdServer) -> None:
    server.add_export("ro", MemoryBackend(MiB), readonly=True)
    async with await NbdBackend.connect(server.address, "ro") as backend:
        assert backend.readonly
        with pytest.raises(PermissionError):
            await backend.write(0, b"x")


async def test_unknown_export_is_a_protocol_error(server: NbdServer) -> None:
    with pytest.raises(NbdProtocolError, match="nope"):
        await NbdClient.connect(server.address, "nope")


async def test_unreachable_server_is_connection_dropped() -> None:
    listener = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    listener.close()
    await listener.wait_closed()
    with pytest.raises(ConnectionDropped):
        await NbdClient.connect(TcpAddress("127.0.0.1", port), "disk")


async def test_byte_counters_count_what_crossed_the_socket(backend: NbdBackend) -> None:
    sent, received = backend.bytes_sent, backend.bytes_received
    await backend.write(0, bytes(100_000))
    await backend.read(0, 50_000)
    assert 100_000 < backend.bytes_sent - sent < 100_000 + 200
    assert 50_000 < backend.bytes_received - received < 50_000 + 200


async def test_dropped_connection_fails_pending_requests_and_the_next_call_reconnects(
    proxy: DroppingProxy, server: NbdServer
) -> None:
    gate = Gate()

    class Stalling(MemoryBackend):
        async def read_into(self, offset: int, buffer: bytearray | memoryview) -> None:
            await gate.passage()
            await super().read_into(offset, buffer)

    server.add_export("stall", Stalling(MiB))
    async with await NbdBackend.connect(proxy.address, "stall") as backend:
        await backend.write(0, b"before")
        pending = [asyncio.create_task(backend.read(0, 6)) for _ in range(5)]
        await gate.reached(5)  # all five are at the server, unanswered
        proxy.drop()
        results = await asyncio.gather(*pending, return_exceptions=True)
        assert all(isinstance(result, ConnectionDropped) for result in results)
        gate.open()
        assert await backend.read(0, 6) == b"before"
        assert backend.reconnects == 1
        assert backend.bytes_sent > 0


async def test_write_buffers_a_backend_keeps_are_never_reused(server: NbdServer) -> None:
    kept: list[memoryview] = []

    class Keeping(MemoryBackend):
        async def write(self, offset: int, data: bytes | memoryview) -> None:
            kept.append(memoryview(data)[:10])  # holds on to the server's receive buffer
            await super().write(offset, data)

    server.add_export("keeping", Keeping(MiB))
    async with await NbdBackend.connect(server.address, "keeping") as backend:
        for pattern in (b"\x01", b"\x02", b"\x03"):
            await backend.write(0, pattern * 100_000)
    assert [bytes(view) for view in kept] == [b"\x01" * 10, b"\x02" * 10, b"\x03" * 10]


async def test_closed_backend_does_not_reconnect(server: NbdServer) -> None:
    backend = await NbdBackend.connect(server.address, "disk")
    await backend.close()
    with pytest.raises(ValueError, match="closed"):
        await backend.read(0, 1)
    assert backend.reconnects == 0


async def test_closed_client_refuses_new_requests(server: NbdServer) -> None:
    client = await NbdClient.connect(server.address, "disk")
    await client.close()
    assert client.closed
    with pytest.raises(ConnectionDropped):
        await client.read(0, 1)


async def test_caller_cancelling_a_request_leaves_the_connection_usable(
    server: NbdServer,
) -> None:
    gate = Gate()

    class Slow(MemoryBackend):
        async def read_into(self, offset: int, buffer: bytearray | memoryview) -> None:
            if offset == 0:
                await gate.passage()
            await super().read_into(offset, buffer)

    server.add_export("slow", Slow(MiB))
    async with await NbdClient.connect(server.address, "slow") as client:
        task = asyncio.create_task(client.read(0, 1000))
        await gate.reached(1)  # the request is at the server: its reply will come late
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.open()
        assert await client.read(4096, 3) == bytes(3)


async def test_a_close_cancelled_while_requests_are_in_flight_still_closes_the_socket(
    server: NbdServer,
) -> None:
    """A close waits (bounded) for requests in flight; cancelled there (a caller's timeout,
    a stop), it must still close its socket, not leave it to the garbage collector."""
    gate = Gate()

    class Stalling(MemoryBackend):
        async def read_into(self, offset: int, buffer: bytearray | memoryview) -> None:
            await gate.passage()
            await super().read_into(offset, buffer)

    server.add_export("stall", Stalling(MiB))
    client = await NbdClient.connect(server.address, "stall")
    sock = client._channel._sock
    reading = asyncio.create_task(client.read(0, 6))
    await gate.reached(1)  # at the server, unanswered: the close waits for it
    closing = asyncio.create_task(client.close())
    await asyncio.sleep(0)  # the close is waiting for the read
    assert not closing.done()
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert sock.fileno() == -1  # closed, not leaked
    assert client.closed
    with pytest.raises(ConnectionDropped):
        await reading
    gate.open()


async def test_a_backend_closed_while_it_reconnects_closes_the_new_connection(
    proxy: DroppingProxy, server: NbdServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = await NbdBackend.connect(proxy.address, "disk")
    assert await backend.read(MiB, 4)  # connected
    proxy.drop()
    with pytest.raises(ConnectionDropped):
        await backend.read(MiB, 4)
    connected = asyncio.Event()
    release = asyncio.Event()
    made: list[NbdClient] = []
    real = NbdClient.connect

    async def held(*args: object, **kwargs: object) -> NbdClient:
        client = await real(*args, **kwargs)  # type: ignore[arg-type]
        made.append(client)
        connected.set()
        await release.wait()
        return client

    monkeypatch.setattr(NbdClient, "connect", held)
    reading = asyncio.create_task(backend.read(MiB, 4))
    await connected.wait()  # the reconnect has its new connection, not yet in place
    await backend.close()
    release.set()
    with pytest.raises(ValueError, match="closed"):
        await reading
    (new,) = made
    assert new.closed and new._channel.closed  # not left open behind a closed backend


# A server that lies, to check the client hangs up instead of trusting it.

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def fake_server(script: Script) -> tuple[asyncio.Server, TcpAddress]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await fake_handshake(reader, writer)
            await script(reader, writer)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, TcpAddress("127.0.0.1", server.sockets[0].getsockname()[1])


async def fake_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Just enough of a server: no structured replies, answers GO with a 1 MiB export."""
    writer.write(p.SERVER_GREETING.pack(p.NBDMAGIC, p.IHAVEOPT, 3))
    await reader.readexactly(4)
    while True:
        _, option, length = p.OPTION_HEADER.unpack(await reader.readexactly(16))
        await reader.readexactly(length)
        if option != p.Option.GO:
            writer.write(p.pack_option_reply(option, p.Reply.ERR_UNSUP))
            continue
        info = p.INFO_EXPORT.pack(p.Info.EXPORT, MiB, p.TransmissionFlag.HAS_FLAGS)
        writer.write(p.pack_option_reply(option, p.Reply.INFO, info))
        writer.write(p.pack_option_reply(option, p.Reply.ACK))
        return


async def test_client_works_with_a_server_without_structured_replies() -> None:
    async def serve_reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            request = p.parse_request(await reader.readexactly(28))
            if request.command == p.Command.DISC:
                return
            writer.write(p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, request.handle))
            writer.write(b"\x5a" * request.length)

    server, address = await fake_server(serve_reads)
    async with server, await NbdBackend.connect(address) as backend:
        assert await backend.read(10, 300_000) == b"\x5a" * 300_000
        assert await backend.extents() == [Extent(0, MiB)]
        assert await backend.checksum(0, 10) is None
        assert await backend.hash_blocks(0, 8192, 4096) is None


async def structured_fake_handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """A server that agrees to structured replies and Ferry's context (and then lies)."""
    writer.write(p.SERVER_GREETING.pack(p.NBDMAGIC, p.IHAVEOPT, 3))
    await reader.readexactly(4)
    while True:
        _, option, length = p.OPTION_HEADER.unpack(await reader.readexactly(16))
        await reader.readexactly(length)
        if option == p.Option.SET_META_CONTEXT:
            context = p.U32.pack(2) + p.FERRY_CHECKSUM_CONTEXT.encode()
            writer.write(p.pack_option_reply(option, p.Reply.META_CONTEXT, context))
        elif option == p.Option.GO:
            info = p.INFO_EXPORT.pack(p.Info.EXPORT, MiB, p.TransmissionFlag.HAS_FLAGS)
            writer.write(p.pack_option_reply(option, p.Reply.INFO, info))
            writer.write(p.pack_option_reply(option, p.Reply.ACK))
            return
        writer.write(p.pack_option_reply(option, p.Reply.ACK))


def digest_chunk(handle: int, kind: int = p.ReplyType.FERRY_WRITE_HASH) -> bytes:
    return p.pack_structured_header(p.ReplyFlag.DONE, kind, handle, 16) + bytes(16)


@pytest.mark.parametrize(
    ("hashed", "reply"),
    [
        (False, digest_chunk(1)),
        (True, digest_chunk(1, p.ReplyType.FERRY_CHECKSUM)),
        (True, p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, 1)),
    ],
    ids=["digest-nobody-asked-for", "checksum-chunk-to-a-write", "hashed-write-without-digest"],
)
async def test_a_write_digest_only_answers_a_hashed_write(hashed: bool, reply: bytes) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = p.parse_request(await reader.readexactly(28))
        await reader.readexactly(request.length)
        writer.write(reply)
        await reader.read()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await structured_fake_handshake(reader, writer)
            await answer(reader, writer)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    address = TcpAddress("127.0.0.1", server.sockets[0].getsockname()[1])
    async with server:
        client = await NbdClient.connect(address)
        assert client.can_checksum
        with pytest.raises(NbdProtocolError):
            if hashed:
                await client.write_hashed(0, b"data")
            else:
                await client.write(0, b"data")
        await client.close()


@pytest.mark.parametrize(
    "reply",
    [
        b"\xde\xad\xbe\xef" + bytes(12),
        p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, 999),
        p.pack_structured_header(p.ReplyFlag.DONE, p.ReplyType.OFFSET_DATA, 1, 8 + 4)
        + (2 * MiB).to_bytes(8, "big")
        + bytes(4),
    ],
    ids=["bad-magic", "unknown-handle", "data-outside-the-read"],
)
async def test_protocol_violations_fail_the_request_and_close_the_client(reply: bytes) -> None:
    async def lie(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(28)
        writer.write(reply)
        await reader.read()

    server, address = await fake_server(lie)
    async with server:
        client = await NbdClient.connect(address)
        with pytest.raises(NbdProtocolError):
            await client.read(0, 4)
        assert client.closed
        await client.close()
