"""The NBD server against raw bytes on the wire: handshake, options, and every bad input.

A tiny hand-rolled client speaks the protocol byte by byte, so these tests
check what the server sends, not what our own client makes of it.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from appliance.datapath.nbd import protocol as p
from appliance.datapath.nbd.channel import UnixAddress
from appliance.datapath.nbd.server import NbdServer
from appliance.storage.hashing import chunk_hash, zero_hash
from appliance.storage.memory import MemoryBackend

MiB = 1024 * 1024
SIZE = 4 * MiB
MAX_BLOCK = 1 * MiB
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


@pytest.fixture
async def disk() -> MemoryBackend:
    backend = MemoryBackend(SIZE)
    await backend.write(MiB, b"\xab" * MiB)
    return backend


@pytest.fixture
async def server(disk: MemoryBackend) -> AsyncIterator[NbdServer]:
    async with NbdServer({"disk": disk}, max_block=MAX_BLOCK) as running:
        yield running


@pytest.fixture
async def wire(server: NbdServer) -> AsyncIterator[Wire]:
    connection = await Wire.open(server)
    yield connection
    await connection.close()


async def assert_still_serving(server: NbdServer) -> None:
    other = await Wire.open(server)
    await other.greet()
    await other.go()
    await other.request(p.Command.READ, MiB, 4)
    _, kind, _, payload = await other.chunk()
    assert kind == p.ReplyType.OFFSET_DATA and payload[8:] == b"\xab" * 4
    await other.request(p.Command.DISC, 0, 0)
    assert await other.closed_by_server()
    await other.close()


# Handshake and options.


async def test_greeting_offers_fixed_newstyle_and_no_zeroes(wire: Wire) -> None:
    assert await wire.greet() == p.HandshakeFlag.FIXED_NEWSTYLE | p.HandshakeFlag.NO_ZEROES


async def test_unknown_client_flags_end_the_connection(wire: Wire, server: NbdServer) -> None:
    await wire.greet(client_flags=0x80)
    assert await wire.closed_by_server()
    await assert_still_serving(server)


async def test_list_names_every_export_including_those_added_later(
    wire: Wire, server: NbdServer
) -> None:
    server.add_export("second", MemoryBackend(MiB))
    await wire.greet()
    replies = await wire.option(p.Option.LIST)
    names = [data[4:].decode() for kind, data in replies if kind == p.Reply.SERVER]
    assert names == ["disk", "second"]
    assert replies[-1][0] == p.Reply.ACK
    assert (await wire.option(p.Option.LIST, b"junk"))[-1][0] == p.Reply.ERR_INVALID


async def test_info_describes_the_export_and_go_enters_transmission(wire: Wire) -> None:
    await wire.greet()
    replies = await wire.option(p.Option.INFO, p.pack_info_request("disk", [p.Info.NAME]))
    infos = {struct.unpack(">H", data[:2])[0]: data for kind, data in replies if kind == 3}
    _, size, flags = p.INFO_EXPORT.unpack(infos[p.Info.EXPORT])
    assert size == SIZE and flags & p.TransmissionFlag.SEND_WRITE_ZEROES
    assert not flags & p.TransmissionFlag.READ_ONLY
    assert p.INFO_BLOCK_SIZE.unpack(infos[p.Info.BLOCK_SIZE])[1:] == (1, 4096, MAX_BLOCK)
    assert infos[p.Info.NAME][2:] == b"disk"
    size, _ = await wire.go()
    assert size == SIZE


async def test_unknown_export_in_go_is_an_error_reply_and_haggling_goes_on(wire: Wire) -> None:
    await wire.greet()
    replies = await wire.option(p.Option.GO, p.pack_info_request("nope", []))
    assert replies[-1][0] == p.Reply.ERR_UNKNOWN
    await wire.go("disk")


async def test_unknown_export_in_export_name_hangs_up(wire: Wire, server: NbdServer) -> None:
    await wire.greet()
    await wire.send(p.pack_option(p.Option.EXPORT_NAME, b"nope"))
    assert await wire.closed_by_server()
    await assert_still_serving(server)


async def test_export_name_replies_size_and_flags_without_zeroes_when_agreed(wire: Wire) -> None:
    await wire.greet(client_flags=3)
    await wire.send(p.pack_option(p.Option.EXPORT_NAME, b"disk"))
    size, flags = p.EXPORT_NAME_REPLY.unpack(await wire.recv(10))
    assert size == SIZE and flags & p.TransmissionFlag.HAS_FLAGS
    await wire.request(p.Command.READ, MiB, 2)
    assert await wire.simple_reply() == (0, 1)
    assert await wire.recv(2) == b"\xab\xab"


async def test_export_name_sends_124_zeroes_to_old_clients(wire: Wire) -> None:
    await wire.greet(client_flags=1)
    await wire.send(p.pack_option(p.Option.EXPORT_NAME, b"disk"))
    await wire.recv(10)
    assert await wire.recv(124) == bytes(124)


@pytest.mark.parametrize("option", [p.Option.STARTTLS, p.Option.EXTENDED_HEADERS, 77])
async def test_unsupported_options_get_err_unsup(wire: Wire, option: int) -> None:
    await wire.greet()
    assert (await wire.option(option))[-1][0] == p.Reply.ERR_UNSUP
    await wire.go()


async def test_malformed_option_data_gets_err_invalid(wire: Wire) -> None:
    await wire.greet()
    assert (await wire.option(p.Option.GO, b"\0\0\0\xff"))[-1][0] == p.Reply.ERR_INVALID
    await wire.go()


async def test_abort_is_acknowledged_then_the_server_hangs_up(wire: Wire) -> None:
    await wire.greet()
    assert (await wire.option(p.Option.ABORT))[-1][0] == p.Reply.ACK
    assert await wire.closed_by_server()


async def test_bad_option_magic_or_oversized_option_ends_the_connection(
    wire: Wire, server: NbdServer
) -> None:
    await wire.greet()
    await wire.send(struct.pack(">QII", 0x1234, p.Option.LIST, 0))
    assert await wire.closed_by_server()
    other = await Wire.open(server)
    await other.greet()
    await other.send(struct.pack(">QII", p.IHAVEOPT, p.Option.LIST, 2**31))
    assert await other.closed_by_server()
    await other.close()
    await assert_still_serving(server)


async def test_meta_contexts_need_structured_replies(wire: Wire) -> None:
    await wire.greet()
    query = p.pack_meta_context_query("disk", [p.BASE_ALLOCATION])
    assert (await wire.option(p.Option.SET_META_CONTEXT, query))[-1][0] == p.Reply.ERR_INVALID


async def test_list_meta_context_offers_base_allocation_and_ferry_checksum(wire: Wire) -> None:
    await wire.greet()
    await wire.option(p.Option.STRUCTURED_REPLY)
    everything = await wire.option(
        p.Option.LIST_META_CONTEXT, p.pack_meta_context_query("disk", [])
    )
    names = {data[4:].decode() for kind, data in everything if kind == p.Reply.META_CONTEXT}
    assert names == {p.BASE_ALLOCATION, p.FERRY_CHECKSUM_CONTEXT}
    query = p.pack_meta_context_query("disk", ["base:", "qemu:dirty-bitmap:x"])
    base = await wire.option(p.Option.LIST_META_CONTEXT, query)
    assert [data[4:] for kind, data in base if kind == p.Reply.META_CONTEXT] == [b"base:allocation"]
    unknown = p.pack_meta_context_query("nope", [])
    assert (await wire.option(p.Option.LIST_META_CONTEXT, unknown))[-1][0] == p.Reply.ERR_UNKNOWN


async def test_set_meta_context_selects_only_known_contexts_with_ids(wire: Wire) -> None:
    await wire.greet()
    await wire.option(p.Option.STRUCTURED_REPLY)
    query = p.pack_meta_context_query("disk", [p.BASE_ALLOCATION, "x-other:thing", "base:"])
    replies = await wire.option(p.Option.SET_META_CONTEXT, query)
    selected = [(data[:4], data[4:]) for kind, data in replies if kind == p.Reply.META_CONTEXT]
    assert len(selected) == 1 and selected[0][1] == b"base:allocation"
    assert selected[0][0] != b"\0\0\0\0"


async def test_handshake_timeout_and_silence_do_not_block_other_clients(
    wire: Wire, server: NbdServer
) -> None:
    await wire.recv(18)  # then say nothing at all
    await assert_still_serving(server)


# Transmission: good requests.


async def test_read_write_flush_trim_and_write_zeroes(wire: Wire, disk: MemoryBackend) -> None:
    await wire.greet()
    await wire.go()
    data = os.urandom(10000)
    await wire.request(p.Command.WRITE, 12345, len(data), flags=p.CommandFlag.FUA, handle=7)
    await wire.send(data)
    assert await wire.simple_reply() == (0, 7)
    assert await disk.read(12345, len(data)) == data
    await wire.request(p.Command.READ, 12345, len(data), handle=8)
    flags, kind, handle, payload = await wire.chunk()
    assert (flags, kind, handle) == (p.ReplyFlag.DONE, p.ReplyType.OFFSET_DATA, 8)
    assert payload == struct.pack(">Q", 12345) + data
    await wire.request(p.Command.FLUSH, 0, 0, handle=9)
    assert await wire.simple_reply() == (0, 9)
    await wire.request(p.Command.WRITE_ZEROES, 12345, 100, flags=p.CommandFlag.NO_HOLE, handle=10)
    assert await wire.simple_reply() == (0, 10)
    await wire.request(p.Command.TRIM, MiB, MiB, handle=11)
    assert await wire.simple_reply() == (0, 11)
    assert await disk.read(12345, 100) == bytes(100)
    assert await disk.read(MiB, MiB) == bytes(MiB)
    assert disk.flushes >= 2


async def test_block_status_reports_holes_and_data(wire: Wire) -> None:
    await wire.greet()
    await wire.go(contexts=(p.BASE_ALLOCATION,))
    await wire.request(p.Command.BLOCK_STATUS, 0, SIZE)
    flags, kind, _, payload = await wire.chunk()
    assert flags & p.ReplyFlag.DONE and kind == p.ReplyType.BLOCK_STATUS
    descriptors = list(p.BLOCK_DESCRIPTOR.iter_unpack(payload[4:]))
    hole_zero = p.StateFlag.HOLE | p.StateFlag.ZERO
    assert descriptors == [(MiB, hole_zero), (MiB, 0), (2 * MiB, hole_zero)]
    await wire.request(p.Command.BLOCK_STATUS, 0, SIZE, flags=p.CommandFlag.REQ_ONE)
    assert len((await wire.chunk())[3]) == 12


async def test_ferry_checksum_command_hashes_ranges_holes_as_zeroes(wire: Wire) -> None:
    await wire.greet()
    await wire.go(contexts=(p.BASE_ALLOCATION, p.FERRY_CHECKSUM_CONTEXT))
    await wire.request(p.Command.FERRY_CHECKSUM, MiB - 10, 20, handle=3)
    flags, kind, handle, digest = await wire.chunk()
    assert (flags, kind, handle) == (p.ReplyFlag.DONE, p.ReplyType.FERRY_CHECKSUM, 3)
    assert digest == chunk_hash(bytes(10) + b"\xab" * 10)
    await wire.request(p.Command.FERRY_CHECKSUM, 3 * MiB, MiB)
    assert (await wire.chunk())[3] == zero_hash(MiB)
    # With the extension on, BLOCK_STATUS carries one chunk per context, DONE on the last.
    await wire.request(p.Command.BLOCK_STATUS, 0, SIZE)
    first, second = await wire.chunk(), await wire.chunk()
    assert not first[0] & p.ReplyFlag.DONE and second[0] & p.ReplyFlag.DONE


async def test_checksum_without_the_context_is_einval(wire: Wire) -> None:
    await wire.greet()
    await wire.go(contexts=(p.BASE_ALLOCATION,))
    await wire.request(p.Command.FERRY_CHECKSUM, 0, 10)
    assert await wire.error_of() == p.Errno.EINVAL


async def test_replies_come_out_of_order_when_requests_finish_out_of_order(
    server: NbdServer,
) -> None:
    gate = asyncio.Event()

    class SlowFirstBlock(MemoryBackend):
        async def read(self, offset: int, length: int) -> bytes:
            if offset == 0:
                await gate.wait()
            return await super().read(offset, length)

    server.add_export("slow", SlowFirstBlock(MiB))
    wire = await Wire.open(server)
    await wire.greet()
    await wire.go("slow")
    await wire.request(p.Command.READ, 0, 10, handle=1)
    await wire.request(p.Command.READ, 4096, 10, handle=2)
    assert (await wire.chunk())[2] == 2
    gate.set()
    assert (await wire.chunk())[2] == 1
    await wire.close()


# Transmission: bad input.


async def test_bad_request_magic_closes_the_connection(wire: Wire, server: NbdServer) -> None:
    await wire.greet()
    await wire.go()
    await wire.send(struct.pack(">IHHQQI", 0xDEADBEEF, 0, p.Command.READ, 1, 0, 10))
    assert await wire.closed_by_server()
    await assert_still_serving(server)


@pytest.mark.parametrize(
    ("command", "offset", "length", "error"),
    [
        (p.Command.READ, SIZE - 10, 20, p.Errno.EINVAL),
        (p.Command.READ, 2**64 - 1, 2, p.Errno.EINVAL),
        (p.Command.READ, 0, MAX_BLOCK + 1, p.Errno.EINVAL),
        (p.Command.TRIM, SIZE, 1, p.Errno.EINVAL),
        (p.Command.WRITE_ZEROES, SIZE - 1, 2, p.Errno.ENOSPC),
        (p.Command.BLOCK_STATUS, SIZE, 1, p.Errno.EINVAL),
        (p.Command.CACHE, 0, 10, p.Errno.EINVAL),
        (0x4242, 0, 10, p.Errno.EINVAL),
    ],
)
async def test_requests_the_spec_answers_with_errors(
    wire: Wire, command: int, offset: int, length: int, error: int
) -> None:
    await wire.greet()
    await wire.go(contexts=(p.BASE_ALLOCATION,))
    await wire.request(command, offset, length)
    assert await wire.error_of() == error
    await wire.request(p.Command.FLUSH, 0, 0, handle=2)
    assert await wire.simple_reply() == (0, 2)


async def test_unknown_flags_are_einval(wire: Wire) -> None:
    await wire.greet()
    await wire.go()
    await wire.request(p.Command.FLUSH, 0, 0, flags=p.CommandFlag.NO_HOLE)
    assert await wire.error_of() == p.Errno.EINVAL


async def test_write_past_the_end_is_enospc_and_its_payload_is_skipped(wire: Wire) -> None:
    await wire.greet()
    await wire.go()
    await wire.request(p.Command.WRITE, SIZE - 2, 4, handle=5)
    await wire.send(b"\xff" * 4)
    assert await wire.error_of() == p.Errno.ENOSPC
    await wire.request(p.Command.READ, SIZE - 2, 2, handle=6)
    assert (await wire.chunk())[3][8:] == b"\0\0"


async def test_simple_replies_carry_errors_when_structured_replies_are_off(wire: Wire) -> None:
    await wire.greet()
    await wire.send(p.pack_option(p.Option.EXPORT_NAME, b"disk"))
    await wire.recv(10)
    await wire.request(p.Command.READ, SIZE, 1, handle=4)
    assert await wire.simple_reply() == (p.Errno.EINVAL, 4)
    await wire.request(p.Command.BLOCK_STATUS, 0, 1, handle=5)
    assert await wire.simple_reply() == (p.Errno.EINVAL, 5)


async def test_oversized_write_closes_the_connection(wire: Wire, server: NbdServer) -> None:
    await wire.greet()
    await wire.go()
    await wire.request(p.Command.WRITE, 0, MAX_BLOCK + 1)
    assert await wire.closed_by_server()
    await assert_still_serving(server)


async def test_readonly_export_refuses_writes_with_eperm(server: NbdServer) -> None:
    server.add_export("ro", MemoryBackend(MiB), readonly=True)
    wire = await Wire.open(server)
    await wire.greet()
    _, flags = await wire.go("ro")
    assert flags & p.TransmissionFlag.READ_ONLY
    await wire.request(p.Command.WRITE, 0, 3)
    await wire.send(b"abc")
    assert await wire.error_of() == p.Errno.EPERM
    for command in (p.Command.TRIM, p.Command.WRITE_ZEROES):
        await wire.request(command, 0, 3)
        assert await wire.error_of() == p.Errno.EPERM
    await wire.close()


@pytest.mark.parametrize("cut", [3, p.REQUEST.size, p.REQUEST.size + 1000])
async def test_client_vanishing_mid_request_leaves_the_server_serving(
    wire: Wire, server: NbdServer, disk: MemoryBackend, cut: int
) -> None:
    await wire.greet()
    await wire.go()
    request = p.pack_request(p.Command.WRITE, 1, 0, 4096) + b"\x11" * 4096
    await wire.send(request[:cut])
    await wire.close()
    await assert_still_serving(server)
    assert await disk.read(0, 4096) == bytes(4096)


async def test_backend_failure_is_an_error_reply_not_a_dead_connection(
    server: NbdServer,
) -> None:
    class Broken(MemoryBackend):
        async def read(self, offset: int, length: int) -> bytes:
            raise OSError(5, "disk on fire")

    server.add_export("broken", Broken(MiB))
    wire = await Wire.open(server)
    await wire.greet()
    await wire.go("broken")
    await wire.request(p.Command.READ, 0, 10)
    assert await wire.error_of() == p.Errno.EIO
    await wire.request(p.Command.FLUSH, 0, 0, handle=2)
    assert await wire.simple_reply() == (0, 2)
    await wire.close()


# Server lifecycle.


async def test_removed_export_refuses_new_connections_only(server: NbdServer) -> None:
    wire = await Wire.open(server)
    await wire.greet()
    await wire.go()
    server.remove_export("disk")
    late = await Wire.open(server)
    await late.greet()
    replies = await late.option(p.Option.GO, p.pack_info_request("disk", []))
    assert replies[-1][0] == p.Reply.ERR_UNKNOWN
    await wire.request(p.Command.READ, MiB, 1)
    assert (await wire.chunk())[3][8:] == b"\xab"
    await wire.close()
    await late.close()


async def test_stop_closes_open_connections(disk: MemoryBackend) -> None:
    server = NbdServer({"disk": disk})
    await server.start()
    wire = await Wire.open(server)
    await wire.greet()
    await wire.go()
    await server.stop()
    assert await wire.closed_by_server()
    assert server.connections == 0
    await wire.close()


async def test_unix_socket_server(tmp_path: Path, disk: MemoryBackend) -> None:
    path = tmp_path / "nbd.sock"
    async with NbdServer({"disk": disk}, address=UnixAddress(path)) as server:
        assert server.url("disk") == f"nbd+unix:///disk?socket={path}"
        await assert_still_serving(server)
    assert not path.exists()
