"""A WAN link on loopback: a TCP proxy that limits the rate and delays every byte.

    async with Shaper([("127.0.0.1", server_port)], rate_bytes_s=125e6, rtt_s=0.005) as link:
        backend = await NbdBackend.connect(TcpAddress("127.0.0.1", link.ports[0]))

or as its own process (so its CPU is not the test's event loop)::

    python -m tests.support.shaper --rate-bits 1e9 --rtt-ms 5 --upstream 127.0.0.1:10809
    # prints "READY <port>" (one port per --upstream), runs until SIGTERM, then
    # prints "STATS <bytes up> <bytes down> <connections>"

Each direction of the link is a :class:`TokenBucket` shared by every
connection (the link is one pipe, whatever crosses it) followed by a delay
line: a segment read from one side *leaves* once the bucket has the tokens
for it (the pump waits for that, which bounds the rate) and *arrives* at the
other side one-way delay (RTT/2) later, delivered by a task of its own. The
pump does not wait for the arrival, so many segments are in flight on the
link at once, as on a real link: throughput is the rate, latency is RTT/2
per direction, and a request/response pair costs one RTT plus its
serialisation. What may be in flight on one connection's direction is
bounded (``window``, several bandwidth-delay products) so a slow receiver
pushes back on the sender.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

SEGMENT = 64 * 1024
"""The most bytes one read takes off a socket: the unit the link paces and delays."""
DEFAULT_BURST = 256 * 1024
MIN_WINDOW = 4 * 1024 * 1024
STOP_GRACE_S = 5.0
SLACK_S = 0.00025
"""A segment due this soon is delivered now. Loop timers tick in whole milliseconds
(uvloop rounds a delay to the nearest one, below half a millisecond to none), so a
deliverer wakes up to a tick early and waits the rest out in loop iterations, with the
clock read precisely (``time.monotonic``); delivering on the next whole tick instead
added about a millisecond per direction (7 ms for a 5 ms RTT, measured)."""


class TokenBucket:
    """When may ``n`` bytes leave: a rate in bytes per second, a burst of ``burst`` bytes.

    Reservations queue: one taken before the bucket had the tokens puts it in
    debt, and the next waits for the debt too. So senders sharing a bucket
    share the rate, first come first served, and a sender that wakes late
    (a busy loop) loses nothing while the bucket refills up to its burst.
    Times come from the caller (``now``), so the arithmetic is testable with
    any clock.
    """

    def __init__(self, rate_bytes_s: float, burst: int, now: float) -> None:
        if rate_bytes_s <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = rate_bytes_s
        self.burst = burst
        self._tokens = float(burst)
        self._stamp = now

    def reserve(self, nbytes: int, now: float) -> float:
        """Take ``nbytes`` tokens; the time (>= ``now``) at which those bytes have left."""
        if now > self._stamp:
            self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
        self._tokens -= nbytes
        if self._tokens >= 0:
            return now
        return now + -self._tokens / self.rate


@dataclass(frozen=True, slots=True)
class Passage:
    """One segment's trip across a direction of the link."""

    leaves: float
    arrives: float


class Direction:
    """One direction of the link: its bucket, then a one-way delay."""

    def __init__(self, rate_bytes_s: float, delay_s: float, burst: int, now: float) -> None:
        if delay_s < 0:
            raise ValueError("the delay cannot be negative")
        self.bucket = TokenBucket(rate_bytes_s, burst, now)
        self.delay_s = delay_s
        self.bytes = 0

    def send(self, nbytes: int, now: float) -> Passage:
        leaves = self.bucket.reserve(nbytes, now)
        self.bytes += nbytes
        return Passage(leaves, leaves + self.delay_s)


@dataclass(eq=False)
class _Pipe:
    """One connection's one direction: segments on the link, delivered in order."""

    writer: asyncio.StreamWriter
    queued: collections.deque[tuple[float, bytes | None]] = field(default_factory=collections.deque)
    in_flight: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when a segment is queued."""
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when segments were handed over (room in the window)."""


class Shaper:
    """The link: one listening port per upstream, every connection through the same buckets."""

    def __init__(
        self,
        upstreams: Sequence[tuple[str, int]],
        *,
        rate_bytes_s: float,
        rtt_s: float,
        burst: int = DEFAULT_BURST,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._upstreams = list(upstreams)
        self._clock = clock
        self._rate = rate_bytes_s
        self._window = max(MIN_WINDOW, int(4 * rate_bytes_s * rtt_s))
        self._delay = rtt_s / 2
        self._burst = burst
        self.up: Direction | None = None
        self.down: Direction | None = None
        self._servers: list[asyncio.Server] = []
        self._handlers: set[asyncio.Task[None]] = set()
        self._open: set[asyncio.StreamWriter] = set()
        """Both sockets of every connection being carried (cut at stop)."""
        self.ports: list[int] = []
        self.connections = 0

    @property
    def bytes_up(self) -> int:
        return self.up.bytes if self.up else 0

    @property
    def bytes_down(self) -> int:
        return self.down.bytes if self.down else 0

    def _now(self) -> float:
        # Not loop.time(): uvloop's is the loop's cached clock, in whole milliseconds.
        return self._clock() if self._clock else time.monotonic()

    async def start(self) -> None:
        now = self._now()
        self.up = Direction(self._rate, self._delay, self._burst, now)
        self.down = Direction(self._rate, self._delay, self._burst, now)
        for host, port in self._upstreams:
            server = await asyncio.start_server(
                functools.partial(self._accept, to=(host, port)), "127.0.0.1", 0
            )
            self._servers.append(server)
            self.ports.append(int(server.sockets[0].getsockname()[1]))

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        self._servers.clear()
        for writer in list(self._open):
            writer.transport.abort()  # the pumps see the cut and end; no task is cancelled
        handlers = list(self._handlers)
        if handlers:
            _, late = await asyncio.wait(handlers, timeout=STOP_GRACE_S)
            for task in late:
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)

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

    async def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, to: tuple[str, int]
    ) -> None:
        handler = asyncio.current_task()
        assert handler is not None and self.up is not None and self.down is not None
        self._handlers.add(handler)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(*to)
            except OSError:
                writer.transport.abort()
                return
            self.connections += 1
            for stream in (writer, up_writer):
                _no_delay(stream)
                self._open.add(stream)
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._carry(reader, writer, up_writer, self.up))
                    group.create_task(self._carry(up_reader, up_writer, writer, self.down))
            except* (ConnectionError, OSError):
                pass
            finally:
                for stream in (writer, up_writer):
                    stream.transport.abort()
                    self._open.discard(stream)
        finally:
            self._handlers.discard(handler)

    async def _carry(
        self,
        reader: asyncio.StreamReader,
        source: asyncio.StreamWriter,
        writer: asyncio.StreamWriter,
        direction: Direction,
    ) -> None:
        """Read one side, pace each segment onto the link, and let a deliverer hand it over.

        ``source`` is the side ``reader`` reads: cut if the other side fails, so the
        read returns and the failure surfaces here (the task group then ends the
        connection)."""
        pipe = _Pipe(writer)
        deliverer = asyncio.create_task(self._deliver(pipe))
        deliverer.add_done_callback(lambda task: _cut_on_error(task, source))
        try:
            while data := await reader.read(SEGMENT):
                while pipe.in_flight >= self._window:
                    pipe.drained.clear()
                    await _wait_or_fail(pipe.drained, deliverer)
                passage = direction.send(len(data), self._now())
                pipe.queued.append((passage.arrives, data))
                pipe.in_flight += len(data)
                pipe.arrived.set()
                if (wait := passage.leaves - self._now()) > 0:
                    await asyncio.sleep(wait)
            pipe.queued.append((self._now() + direction.delay_s, None))
            pipe.arrived.set()
            await deliverer
        finally:
            deliverer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await deliverer

    async def _deliver(self, pipe: _Pipe) -> None:
        """Hand segments over in order, each when its arrival time has come."""
        while True:
            while not pipe.queued:
                pipe.arrived.clear()
                await pipe.arrived.wait()
            arrives, _ = pipe.queued[0]
            if (wait := arrives - self._now()) > SLACK_S:
                await asyncio.sleep(wait)
            if pipe.writer.transport.is_closing():
                # Cut (the link stopped, the peer went): uvloop would raise RuntimeError.
                raise ConnectionResetError("the link was cut")
            batch: list[bytes] = []
            now = self._now()
            while pipe.queued and pipe.queued[0][0] <= now + SLACK_S:
                _, data = pipe.queued.popleft()
                if data is None:
                    pipe.writer.writelines(batch)
                    await pipe.writer.drain()
                    if pipe.writer.can_write_eof():
                        pipe.writer.write_eof()
                    return
                batch.append(data)
            pipe.writer.writelines(batch)
            await pipe.writer.drain()
            pipe.in_flight -= sum(len(piece) for piece in batch)
            pipe.drained.set()


def _cut_on_error(task: asyncio.Task[None], source: asyncio.StreamWriter) -> None:
    if not task.cancelled() and task.exception() is not None:
        source.transport.abort()


async def _wait_or_fail(event: asyncio.Event, task: asyncio.Task[None]) -> None:
    """Wait for ``event``; if ``task`` ends first (it failed), raise its error."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if task.done():
        task.result()
        raise ConnectionResetError("the link's receiving side has gone")


def _no_delay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# -- as its own process ----------------------------------------------------------------------


def parse_upstream(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def _serve(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    link = Shaper(
        [parse_upstream(u) for u in args.upstream],
        rate_bytes_s=args.rate_bits / 8,
        rtt_s=args.rtt_ms / 1000,
    )
    async with link:
        print("READY " + " ".join(str(p) for p in link.ports), flush=True)
        await stop.wait()
    print(f"STATS {link.bytes_up} {link.bytes_down} {link.connections}", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A shaped TCP link on 127.0.0.1.")
    parser.add_argument("--upstream", action="append", required=True, help="HOST:PORT")
    parser.add_argument("--rate-bits", type=float, default=1e9, help="bits per second")
    parser.add_argument("--rtt-ms", type=float, default=5.0)
    args = parser.parse_args(argv)
    from appliance.cli import run_async

    run_async(_serve(args))


@dataclass
class LinkStats:
    bytes_up: int = 0
    bytes_down: int = 0
    connections: int = 0


@dataclass
class ShaperProcess:
    pid: int
    ports: list[int]
    stats: LinkStats = field(default_factory=LinkStats)


@contextlib.contextmanager
def shaper_process(
    upstreams: Sequence[tuple[str, int]], *, rate_bits: float, rtt_ms: float, cwd: Path
) -> Iterator[ShaperProcess]:
    """The shaper as a child process; stopped by its PID (SIGTERM) on the way out."""
    command = [sys.executable, "-m", "tests.support.shaper"]
    command += [f"--rate-bits={rate_bits}", f"--rtt-ms={rtt_ms}"]
    command += [f"--upstream={host}:{port}" for host, port in upstreams]
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, text=True)
    link = ShaperProcess(process.pid, [])
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("READY "), f"the shaper did not start: {line!r}"
        link.ports = [int(p) for p in line.split()[1:]]
        yield link
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            rest, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            rest, _ = process.communicate()
    for line in (rest or "").splitlines():
        if line.startswith("STATS "):
            up, down, connections = (int(x) for x in line.split()[1:])
            link.stats = LinkStats(up, down, connections)


if __name__ == "__main__":
    main()
