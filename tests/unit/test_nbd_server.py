"""The NBD server's transmission phase against raw bytes: requests, replies, bad input.

A hand-rolled peer (tests.support.nbd_wire) speaks the protocol byte by
byte; every bad input must get the protocol's error or a closed connection,
and the server must go on serving everyone else.
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
from tests.support.nbd_wire import Wire

MiB = 1024 * 1024
SIZE = 4 * MiB
MAX_BLOCK = 1 * MiB


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


async def test_ferry_checksum_per_block_answers_a_digest_per_block(
    wire: Wire, disk: MemoryBackend
) -> None:
    await wire.greet()
    await wire.go(contexts=(p.FERRY_CHECKSUM_CONTEXT,))
    start, length, block = MiB - 3 * 4096, 5 * 4096 + 100, 4096  # six blocks, the last clipped
    await wire.request(
        p.Command.FERRY_CHECKSUM, start, length, flags=p.ferry_block_flags(block), handle=5
    )
    flags, kind, handle, payload = await wire.chunk()
    assert (flags, kind, handle) == (p.ReplyFlag.DONE, p.ReplyType.FERRY_CHECKSUM, 5)
    data = await disk.read(start, length)
    expected = [chunk_hash(data[at : at + block]) for at in range(0, length, block)]
    assert len(expected) == 6 and len(data[5 * block :]) == 100
    assert [payload[i : i + 16] for i in range(0, len(payload), 16)] == expected


@pytest.mark.parametrize(
    "flags",
    [
        p.CommandFlag.FERRY_BLOCKS | 11 << 8,  # 2 KiB: below the smallest block
        p.CommandFlag.FERRY_BLOCKS | 26 << 8,  # 64 MiB: above the largest
        12 << 8,  # block bits without the per-block flag
    ],
    ids=["too-small", "too-large", "bits-without-flag"],
)
async def test_ferry_checksum_with_a_bad_block_size_is_einval(wire: Wire, flags: int) -> None:
    await wire.greet()
    await wire.go(contexts=(p.FERRY_CHECKSUM_CONTEXT,))
    await wire.request(p.Command.FERRY_CHECKSUM, 0, MiB, flags=flags, handle=6)
    _, kind, handle, payload = await wire.chunk()
    assert kind == p.ReplyType.ERROR and handle == 6
    assert p.ERROR_HEADER.unpack_from(payload)[0] == p.Errno.EINVAL


async def test_hashed_write_replies_with_the_digest_of_the_bytes_received(
    wire: Wire, disk: MemoryBackend
) -> None:
    await wire.greet()
    await wire.go(contexts=(p.BASE_ALLOCATION, p.FERRY_CHECKSUM_CONTEXT))
    data = os.urandom(70_000)
    await wire.request(p.Command.WRITE, 4097, len(data), flags=p.CommandFlag.FERRY_HASH, handle=4)
    await wire.send(data)
    flags, kind, handle, digest = await wire.chunk()
    assert (flags, kind, handle) == (p.ReplyFlag.DONE, p.ReplyType.FERRY_WRITE_HASH, 4)
    assert digest == chunk_hash(data)
    assert await disk.read(4097, len(data)) == data
    flushes = disk.flushes
    hashed_fua = p.CommandFlag.FERRY_HASH | p.CommandFlag.FUA
    await wire.request(p.Command.WRITE, 0, 3, flags=hashed_fua, handle=5)
    await wire.send(b"abc")
    reply = await wire.chunk()
    assert reply == (p.ReplyFlag.DONE, p.ReplyType.FERRY_WRITE_HASH, 5, chunk_hash(b"abc"))
    assert disk.flushes == flushes + 1
    # A plain write on the same connection still gets a plain reply.
    await wire.request(p.Command.WRITE, 0, 3, handle=6)
    await wire.send(b"xyz")
    assert await wire.simple_reply() == (0, 6)


@pytest.mark.parametrize(
    "contexts", [(), (p.BASE_ALLOCATION,)], ids=["no-structured-replies", "base-only"]
)
async def test_hash_flag_without_the_context_is_einval_and_writes_nothing(
    wire: Wire, disk: MemoryBackend, contexts: tuple[str, ...]
) -> None:
    await wire.greet()
    if contexts:
        await wire.go(contexts=contexts)
    else:
        await wire.send(p.pack_option(p.Option.EXPORT_NAME, b"disk"))
        await wire.recv(10)
    await wire.request(p.Command.WRITE, 0, 4, flags=p.CommandFlag.FERRY_HASH, handle=3)
    await wire.send(b"\xee" * 4)
    if contexts:
        assert await wire.error_of() == p.Errno.EINVAL
    else:
        assert await wire.simple_reply() == (p.Errno.EINVAL, 3)
    assert await disk.read(0, 4) == bytes(4)
    await wire.request(p.Command.FLUSH, 0, 0, handle=7)  # the payload was consumed: in step
    assert await wire.simple_reply() == (0, 7)


@pytest.mark.parametrize(("offset", "error"), [(SIZE - 2, p.Errno.ENOSPC), (0, p.Errno.EPERM)])
async def test_a_hashed_write_that_fails_gets_an_error_not_a_digest(
    server: NbdServer, offset: int, error: int
) -> None:
    server.add_export("ro", MemoryBackend(SIZE), readonly=True)
    wire = await Wire.open(server)
    await wire.greet()
    await wire.go("ro" if error == p.Errno.EPERM else "disk", (p.FERRY_CHECKSUM_CONTEXT,))
    await wire.request(p.Command.WRITE, offset, 4, flags=p.CommandFlag.FERRY_HASH)
    await wire.send(b"\x01" * 4)
    assert await wire.error_of() == error
    await wire.close()


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
        async def read_into(self, offset: int, buffer: bytearray | memoryview) -> None:
            if offset == 0:
                await gate.wait()
            await super().read_into(offset, buffer)

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
        async def read_into(self, offset: int, buffer: bytearray | memoryview) -> None:
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
