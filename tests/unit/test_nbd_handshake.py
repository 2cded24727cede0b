"""The NBD server's handshake against raw bytes: greeting, every option, bad haggling.

A hand-rolled peer (tests.support.nbd_wire) speaks the protocol byte by
byte, so these tests check what the server sends, not what our client makes of it.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator

import pytest

from appliance.datapath.nbd import protocol as p
from appliance.datapath.nbd.server import NbdServer
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
