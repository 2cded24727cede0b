"""The socket channel under the NBD code: exact reads, gathered partial sends, buffer reuse."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from appliance.datapath.buffers import POOL_MIN_BUFFER, BufferPool, exported
from appliance.datapath.nbd.channel import (
    Channel,
    TcpAddress,
    UnixAddress,
    connect,
    nbd_url,
)
from appliance.errors import ConnectionDropped


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Channel, socket.socket]]:
    ours, theirs = socket.socketpair()
    # Small buffers force partial sends and several receives per payload.
    for sock in (ours, theirs):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    channel = Channel(ours, "pair")
    theirs.setblocking(False)
    yield channel, theirs
    channel.close()
    theirs.close()


async def pump_in(sock: socket.socket, data: bytes) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, data)


async def pump_out(sock: socket.socket, length: int) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while len(out) < length:
        out += await loop.sock_recv(sock, length - len(out))
    return bytes(out)


async def test_small_and_large_reads_come_out_exact_and_in_order(
    pair: tuple[Channel, socket.socket],
) -> None:
    channel, peer = pair
    payload = os.urandom(1_000_000)
    feeder = asyncio.create_task(pump_in(peer, b"head" + payload + b"tail!"))
    assert await channel.read_exactly(4) == b"head"
    buffer = bytearray(len(payload))
    await channel.read_into(memoryview(buffer))
    assert buffer == payload
    assert await channel.read_exactly(5) == b"tail!"
    await feeder
    assert channel.bytes_received == len(payload) + 9


async def test_send_gathers_buffers_through_partial_writes(
    pair: tuple[Channel, socket.socket],
) -> None:
    channel, peer = pair
    parts: list[bytes | memoryview] = [
        b"x" * 10, os.urandom(300_000), memoryview(os.urandom(70_000))[5:], b"",
    ]  # fmt: skip
    expected = b"".join(bytes(part) for part in parts)
    reader = asyncio.create_task(pump_out(peer, 3 * len(expected)))
    await asyncio.gather(*(channel.send(*parts) for _ in range(3)))
    # Concurrent senders never interleave: the stream is three whole copies.
    assert await reader == expected * 3
    assert channel.bytes_sent == 3 * len(expected)


async def test_end_of_stream_is_connection_dropped(pair: tuple[Channel, socket.socket]) -> None:
    channel, peer = pair
    await pump_in(peer, b"abc")
    peer.shutdown(socket.SHUT_WR)
    with pytest.raises(ConnectionDropped):
        await channel.read_exactly(4)


async def test_discard_skips_bytes(pair: tuple[Channel, socket.socket]) -> None:
    channel, peer = pair
    feeder = asyncio.create_task(pump_in(peer, bytes(2_000_000) + b"next"))
    await channel.discard(2_000_000)
    assert await channel.read_exactly(4) == b"next"
    await feeder


async def test_connect_to_nothing_is_connection_dropped() -> None:
    with pytest.raises(ConnectionDropped):
        await connect(UnixAddress(Path("/nonexistent/ferry.sock")), 1.0)


def test_exported_tells_whether_a_view_is_alive() -> None:
    buffer = bytearray(b"abcdef")
    assert not exported(buffer)
    view = memoryview(buffer)[2:]
    assert exported(buffer)
    assert buffer == b"abcdef"
    view.release()
    assert not exported(buffer) and buffer == b"abcdef"


def test_pool_reuses_free_buffers_but_never_one_still_in_view() -> None:
    pool = BufferPool(max_bytes=4 * POOL_MIN_BUFFER)
    first = pool.take(POOL_MIN_BUFFER)
    pool.give(first)
    assert pool.take(POOL_MIN_BUFFER - 1 + 1) is first
    kept = memoryview(first)
    pool.give(first)
    assert pool.take(POOL_MIN_BUFFER) is not first
    kept.release()
    small = pool.take(10)
    pool.give(small)
    assert pool.take(10) is not small


def test_pool_keeps_at_most_max_bytes_idle() -> None:
    pool = BufferPool(max_bytes=2 * POOL_MIN_BUFFER)
    buffers = [pool.take(POOL_MIN_BUFFER) for _ in range(3)]
    for buffer in buffers:
        pool.give(buffer)
    again = [pool.take(POOL_MIN_BUFFER) for _ in range(3)]
    assert sum(any(a is b for b in buffers) for a in again) == 2


def test_urls_for_tcp_and_unix_addresses() -> None:
    assert nbd_url(TcpAddress("127.0.0.1", 10809), "vm disk") == "nbd://127.0.0.1:10809/vm%20disk"
    unix = UnixAddress(Path("/run/x.sock"))
    assert nbd_url(unix, "d") == "nbd+unix:///d?socket=/run/x.sock"
