"""The bench's WAN link (tests/support/shaper.py): its arithmetic, and bytes through it intact.

The pacing and the delay line are checked on their arithmetic with times
given by the test; the real proxy is checked on bytes, and on time only as a
lower bound (a loaded machine can only make a transfer slower).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import pytest
import uvloop

from tests.support.shaper import SLACK_S, Direction, Shaper, TokenBucket

KIB = 1024
MIB = 1024 * KIB


def test_a_bucket_lets_its_burst_through_at_once_then_paces_at_its_rate() -> None:
    bucket = TokenBucket(rate_bytes_s=1000, burst=100, now=0.0)
    assert bucket.reserve(100, now=0.0) == 0.0
    assert bucket.reserve(50, now=0.0) == pytest.approx(0.05)
    # Reservations queue: the next waits for the debt of the one before.
    assert bucket.reserve(50, now=0.0) == pytest.approx(0.10)
    assert bucket.reserve(100, now=0.05) == pytest.approx(0.20)


def test_a_bucket_refills_with_time_but_never_above_its_burst() -> None:
    bucket = TokenBucket(rate_bytes_s=1000, burst=100, now=0.0)
    bucket.reserve(100, now=0.0)
    assert bucket.reserve(40, now=0.04) == pytest.approx(0.04)  # 40 tokens came back
    # Idle for ten seconds: 10,000 tokens' worth of time, but the bucket holds 100.
    assert bucket.reserve(100, now=10.0) == 10.0
    assert bucket.reserve(100, now=10.0) == pytest.approx(10.1)


def test_a_late_sender_loses_nothing_within_the_burst() -> None:
    """The pump wakes late on a busy loop: the rate it gets is still the bucket's."""
    bucket = TokenBucket(rate_bytes_s=1000, burst=100, now=0.0)
    leaves = bucket.reserve(200, now=0.0)
    assert leaves == pytest.approx(0.1)
    # It woke 0.05 s late; the bucket refilled meanwhile, so the next 50 bytes leave now.
    assert bucket.reserve(50, now=0.15) == 0.15


def test_rate_and_burst_must_be_positive() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0, 100, 0.0)
    with pytest.raises(ValueError):
        TokenBucket(100, 0, 0.0)
    with pytest.raises(ValueError):
        Direction(100, -1.0, 100, 0.0)


def test_the_delay_is_a_line_not_a_stall_per_segment() -> None:
    """Ten segments sent back to back arrive one delay after each left, spaced by the rate."""
    direction = Direction(rate_bytes_s=1000, delay_s=0.5, burst=100, now=0.0)
    passages = [direction.send(100, now=0.0) for _ in range(10)]
    assert [p.leaves for p in passages] == pytest.approx([0.1 * i for i in range(10)])
    assert [p.arrives - p.leaves for p in passages] == pytest.approx([0.5] * 10)
    # The whole train takes serialisation plus one delay (1.4 s), not 10 delays (5 s).
    assert passages[-1].arrives == pytest.approx(1.4)
    assert direction.bytes == 1000


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(100_000):
        writer.write(data)
        await writer.drain()
    writer.close()


async def round_trip(port: int, payload: bytes) -> bytes:
    """Send ``payload`` while reading the echo; the client half-closes, the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        view = memoryview(payload)
        for at in range(0, len(view), 37_000):  # odd pieces: segments do not line up
            writer.write(view[at : at + 37_000])
            await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    received = await reader.read(-1)
    await sender
    writer.close()
    return received


async def test_bytes_cross_the_link_intact_both_ways_on_several_connections() -> None:
    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    payloads = [os.urandom(size) for size in (1, 65_536, 3 * MIB + 17)]
    try:
        async with Shaper([("127.0.0.1", port)], rate_bytes_s=500e6, rtt_s=0.002) as link:
            echoed = await asyncio.gather(*(round_trip(link.ports[0], p) for p in payloads))
            assert echoed == payloads
            total = sum(len(p) for p in payloads)
            assert (link.bytes_up, link.bytes_down, link.connections) == (total, total, 3)
    finally:
        server.close()
        await server.wait_closed()


async def test_the_link_is_no_faster_than_its_rate_and_delay() -> None:
    """Lower bounds only: 1 MiB at 8 MB/s with a 256 KiB burst, and one RTT per exchange."""
    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    try:
        async with Shaper(
            [("127.0.0.1", port)], rate_bytes_s=8e6, rtt_s=0.05, burst=256 * KIB
        ) as link:
            started = loop.time()
            assert await round_trip(link.ports[0], b"x") == b"x"
            # There and back: one RTT (each way may be early by the timer slack).
            assert loop.time() - started >= 0.05 - 2 * SLACK_S

            payload = os.urandom(MIB)
            started = loop.time()
            assert await round_trip(link.ports[0], payload) == payload
            # Each way: (1 MiB - burst) / rate of pacing, plus half the RTT.
            assert loop.time() - started >= (MIB - 256 * KIB) / 8e6 + 0.025 - SLACK_S
    finally:
        server.close()
        await server.wait_closed()


async def test_a_refused_upstream_closes_the_client_connection() -> None:
    probe = await asyncio.start_server(echo, "127.0.0.1", 0)
    dead_port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    async with Shaper([("127.0.0.1", dead_port)], rate_bytes_s=1e6, rtt_s=0.001) as link:
        reader, writer = await asyncio.open_connection("127.0.0.1", link.ports[0])
        try:
            assert await reader.read(-1) == b""
        except ConnectionResetError:
            pass
        writer.close()
        assert link.connections == 0


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop])
def test_stopping_the_link_cuts_open_connections_and_ends_every_handler(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """On both loops (the bench runs the shaper on uvloop, whose closed transports raise
    RuntimeError where asyncio's raise ConnectionError)."""
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        handler_errors = runner.run(stop_with_traffic())
    assert handler_errors == []


async def stop_with_traffic() -> list[dict[str, object]]:
    errors: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))
    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        link = Shaper([("127.0.0.1", port)], rate_bytes_s=1e6, rtt_s=0.001)
        await link.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", link.ports[0])
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"  # the connection is carried
        await link.stop()
        try:
            assert await reader.read(-1) == b""
        except ConnectionResetError:
            pass
        writer.close()
        assert not link._handlers and not link._open
    finally:
        server.close()
        await server.wait_closed()
    return errors
