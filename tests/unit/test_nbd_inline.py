"""The NBD server's inline fast path over a real file: small READs the page cache holds and
small WRITEs are served by the connection's reader, with no thread, their replies batched.

A hand-rolled peer (tests.support.nbd_wire) pipelines raw requests; every
reply is checked byte for byte, and the file afterwards.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from appliance.datapath.nbd import protocol as p
from appliance.datapath.nbd.server import NbdServer
from appliance.storage.file import INLINE_LIMIT, FileBackend
from tests.support.nbd_wire import Wire

KiB = 1024
MiB = 1024 * KiB
SIZE = 32 * MiB


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    """A file of random bytes, written just now: its pages are in the page cache."""
    content = random.Random(9).randbytes(SIZE)
    path = tmp_path / "disk.raw"
    path.write_bytes(content)
    return path, content


@pytest.fixture
async def backend(image: tuple[Path, bytes]) -> AsyncIterator[FileBackend]:
    async with FileBackend.open(image[0], workers=1) as opened:
        yield opened


async def open_wire(server: NbdServer, *, structured: bool, export: str = "disk") -> Wire:
    wire = await Wire.open(server)
    await wire.greet()
    if structured:
        await wire.go(export)
    else:
        await wire.send(p.pack_option(p.Option.EXPORT_NAME, export.encode()))
        await wire.recv(10)  # size and flags; no zeroes (the client said NO_ZEROES)
    return wire


async def test_small_io_is_served_while_every_file_thread_is_busy(
    backend: FileBackend, image: tuple[Path, bytes]
) -> None:
    """The backend's only worker thread is held: the old path (a thread per request)
    could not answer until it is released; the inline path answers at once."""
    path, content = image
    gate = threading.Event()
    held = backend._executor.submit(gate.wait)
    try:
        async with NbdServer({"disk": backend}) as server:
            wire = await open_wire(server, structured=True)
            await wire.request(p.Command.READ, 12345, 4 * KiB, handle=1)
            flags, kind, handle, payload = await wire.chunk()
            assert (flags, kind, handle) == (p.ReplyFlag.DONE, p.ReplyType.OFFSET_DATA, 1)
            assert payload == (12345).to_bytes(8, "big") + content[12345 : 12345 + 4 * KiB]
            data = os.urandom(INLINE_LIMIT)
            await wire.request(p.Command.WRITE, MiB + 7, len(data), handle=2)
            await wire.send(data)
            assert await wire.simple_reply() == (0, 2)
            # Larger than the inline limit: waits for the thread, answered once it is free.
            await wire.request(p.Command.READ, 2 * MiB, INLINE_LIMIT + 1, handle=3)
            gate.set()
            _, _, handle, payload = await wire.chunk()
            assert handle == 3
            assert payload[8:] == content[2 * MiB : 2 * MiB + INLINE_LIMIT + 1]
            await wire.request(p.Command.DISC, 0, 0)
            assert await wire.closed_by_server()
            await wire.close()
    finally:
        gate.set()
        held.result()
    with path.open("rb") as file:
        file.seek(MiB + 7)
        assert file.read(len(data)) == data


@pytest.mark.parametrize("structured", [True, False])
async def test_a_pipelined_burst_is_answered_exactly(
    backend: FileBackend, image: tuple[Path, bytes], structured: bool
) -> None:
    """Reads and writes of every size, inline or not, FUA and FLUSH among them, sent in
    one go: more reply bytes than one batch holds, each reply exact, the file exact."""
    path, content = image
    rng = random.Random(5)
    expected = bytearray(content)
    requests: list[bytes] = []
    reads: dict[int, tuple[int, int]] = {}
    writes: set[int] = set()
    for handle in range(1, 161):
        # Reads in the first half of the disk, writes in the second, each in a slot of
        # its own: no overlap, so nothing depends on the order the server serves them in.
        length = rng.choice([1, 512, 4 * KiB, 60 * KiB, INLINE_LIMIT, 200 * KiB])
        if handle % 2:
            offset = rng.randrange(0, SIZE // 2 - length)
            reads[handle] = (offset, length)
            requests.append(p.pack_request(p.Command.READ, handle, offset, length))
        else:
            offset = SIZE // 2 + handle * 100 * KiB + rng.randrange(0, 200 * KiB - length + 1)
            data = rng.randbytes(length)
            expected[offset : offset + length] = data
            flags = p.CommandFlag.FUA if handle % 10 == 0 else 0
            writes.add(handle)
            requests.append(p.pack_request(p.Command.WRITE, handle, offset, length, flags) + data)
    requests.append(p.pack_request(p.Command.FLUSH, 999, 0, 0))
    async with NbdServer({"disk": backend}) as server:
        wire = await open_wire(server, structured=structured)
        await wire.send(*requests)
        answered: set[int] = set()
        for _ in range(len(reads) + len(writes) + 1):
            handle = await next_reply(wire, reads, content, structured=structured)
            assert handle not in answered
            answered.add(handle)
        assert answered == set(reads) | writes | {999}
        await wire.request(p.Command.DISC, 0, 0)
        assert await wire.closed_by_server()
        await wire.close()
    assert path.read_bytes() == bytes(expected)


async def next_reply(
    wire: Wire, reads: dict[int, tuple[int, int]], content: bytes, *, structured: bool
) -> int:
    """Read one reply, check it (a read's bytes against ``content``), return its handle."""
    magic = int.from_bytes(await wire.recv(4), "big")
    if magic == p.SIMPLE_REPLY_MAGIC:
        error, handle = p.SIMPLE_REPLY_TAIL.unpack(await wire.recv(12))
        assert error == 0
        if handle in reads and not structured:
            offset, length = reads[handle]
            assert await wire.recv(length) == content[offset : offset + length]
        else:
            assert handle not in reads
        return int(handle)
    assert structured and magic == p.STRUCTURED_REPLY_MAGIC
    flags, kind, handle, length = p.STRUCTURED_REPLY_TAIL.unpack(await wire.recv(16))
    payload = await wire.recv(length)
    assert (flags, kind) == (p.ReplyFlag.DONE, p.ReplyType.OFFSET_DATA)
    offset, size = reads[handle]
    assert payload == offset.to_bytes(8, "big") + content[offset : offset + size]
    return int(handle)


async def test_inline_requests_keep_the_errors_of_the_ordinary_path(
    backend: FileBackend, image: tuple[Path, bytes]
) -> None:
    path, content = image
    async with NbdServer({"disk": backend}) as server:
        server.add_export("ro", backend, readonly=True)
        wire = await open_wire(server, structured=True, export="ro")
        await wire.request(p.Command.WRITE, 0, 3, handle=1)
        await wire.send(b"abc")
        assert await wire.error_of() == p.Errno.EPERM
        await wire.close()
        wire = await open_wire(server, structured=True)
        await wire.request(p.Command.WRITE, SIZE - 2, 3, handle=2)
        await wire.send(b"xyz")  # skipped: the next request is read where it should be
        assert await wire.error_of() == p.Errno.ENOSPC
        await wire.request(p.Command.READ, SIZE - 2, 3, handle=3)
        assert await wire.error_of() == p.Errno.EINVAL
        await wire.request(p.Command.READ, SIZE - 4, 4, handle=4)
        _, _, handle, payload = await wire.chunk()
        assert (handle, payload[8:]) == (4, content[-4:])
        await wire.close()
    assert path.read_bytes() == content


async def test_file_inline_calls_refuse_what_they_cannot_do_at_once(
    backend: FileBackend, image: tuple[Path, bytes], tmp_path: Path
) -> None:
    _, content = image
    view = memoryview(bytearray(INLINE_LIMIT + 1))
    assert backend.read_inline(100, view[:INLINE_LIMIT])
    assert view[:INLINE_LIMIT] == content[100 : 100 + INLINE_LIMIT]
    assert not backend.read_inline(0, view)  # over the limit
    assert not backend.read_inline(SIZE - 10, view[:11])  # past the end
    assert not backend.write_inline(0, view)
    assert not backend.write_inline(SIZE - 10, view[:11])
    assert backend.write_inline(SIZE - 10, memoryview(b"0123456789"))
    assert await backend.read(SIZE - 10, 10) == b"0123456789"
    async with FileBackend.open(backend.path, readonly=True) as readonly:
        assert not readonly.write_inline(0, memoryview(b"x"))
        assert readonly.read_inline(SIZE - 10, view[:10])
    await backend.close()
    assert not backend.read_inline(0, view[:10])
    assert not backend.write_inline(0, view[:10])
    await asyncio.sleep(0)
