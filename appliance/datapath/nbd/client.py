"""An asyncio NBD client: one connection, many requests in flight.

Requests are written under the channel's send lock and matched to replies
by handle; one reader task owns the receiving side and completes a future
per request. READ replies are received straight into the request's buffer,
whether the server sends simple replies or structured chunks (data, holes).

With Ferry's extension negotiated, ``write_hashed`` is a WRITE whose reply
carries the digest of the payload as the server received it (see
``protocol``).

Each request here must fit the server's maximum block size; ``NbdBackend``
splits larger ones. When the connection fails every pending and later
request raises ``ConnectionDropped`` (or ``NbdProtocolError`` if the server
broke the protocol); the client is then ``closed`` and a new one is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from appliance.datapath.buffers import BufferPool
from appliance.datapath.nbd import protocol as p
from appliance.datapath.nbd.channel import Buffer, Channel, NbdAddress, connect
from appliance.datapath.nbd.client_handshake import ClientHandshake, ExportInfo
from appliance.errors import ConnectionDropped, NbdCommandError, NbdProtocolError, OutOfSpace
from appliance.storage.extents import Extent
from appliance.storage.hashing import DIGEST_SIZE

CONNECT_TIMEOUT = 10.0
CLOSE_TIMEOUT = 10.0
MAX_STATUS_PAYLOAD = 16 * 1024 * 1024
_WRITING = frozenset({p.Command.WRITE, p.Command.WRITE_ZEROES, p.Command.FLUSH, p.Command.TRIM})
"""Requests whose ENOSPC means the export's storage is full (see ``OutOfSpace``)."""


@dataclass(slots=True, eq=False)
class _Pending:
    command: p.Command
    flags: int
    offset: int
    length: int
    future: asyncio.Future[None]
    buffer: memoryview | None = None
    received: int = 0
    extents: list[Extent] = field(default_factory=list)
    digest: bytes | None = None
    error: int = 0


def _command_name(command: int) -> str:
    try:
        return p.Command(command).name
    except ValueError:
        return str(command)


class NbdClient:
    def __init__(self, channel: Channel, info: ExportInfo) -> None:
        self._channel = channel
        self._info = info
        self._pending: dict[int, _Pending] = {}
        self._handles = itertools.count(1)
        self._failure: ConnectionDropped | NbdProtocolError | None = None
        self._buffers = BufferPool()
        self._reader = asyncio.create_task(self._read_replies())

    @classmethod
    async def connect(
        cls, address: NbdAddress, export: str = "", *, connect_timeout: float = CONNECT_TIMEOUT
    ) -> NbdClient:
        """Connect and negotiate; unreachable servers raise ``ConnectionDropped``."""
        channel = await connect(address, connect_timeout)
        try:
            async with asyncio.timeout(connect_timeout):
                info = await ClientHandshake(channel, export).run()
        except TimeoutError as exc:
            channel.close()
            raise ConnectionDropped(str(address), f"handshake timed out: {exc!r}") from exc
        except BaseException:
            channel.close()
            raise
        return cls(channel, info)

    @property
    def info(self) -> ExportInfo:
        return self._info

    @property
    def size(self) -> int:
        return self._info.size

    @property
    def peer(self) -> str:
        return self._channel.peer

    @property
    def closed(self) -> bool:
        return self._failure is not None

    @property
    def bytes_sent(self) -> int:
        return self._channel.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self._channel.bytes_received

    @property
    def can_checksum(self) -> bool:
        """The server speaks Ferry's extension: checksum requests and hashed writes."""
        return self._info.checksum_context is not None

    async def read_into(self, offset: int, buffer: bytearray | memoryview) -> None:
        """Fill ``buffer`` (bytes, writable) from ``offset`` with one READ request."""
        view = memoryview(buffer).cast("B")
        await self._submit(p.Command.READ, offset, len(view), buffer=view)

    async def read(self, offset: int, length: int) -> bytes:
        buffer = self._buffers.take(length)
        view = memoryview(buffer)[:length]
        await self.read_into(offset, view)
        data = bytes(view)
        view.release()
        self._buffers.give(buffer)
        return data

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        flags = p.CommandFlag.FUA if fua else 0
        await self._submit(p.Command.WRITE, offset, len(data), flags=flags, payload=data)

    async def write_hashed(self, offset: int, data: Buffer, *, fua: bool = False) -> bytes:
        """WRITE, answered with the digest of the bytes the server received and wrote."""
        if self._info.checksum_context is None:
            raise NbdProtocolError(f"server did not agree to {p.FERRY_CHECKSUM_CONTEXT}")
        flags = p.CommandFlag.FERRY_HASH | (p.CommandFlag.FUA if fua else 0)
        pending = await self._submit(p.Command.WRITE, offset, len(data), flags=flags, payload=data)
        if pending.digest is None:
            raise NbdProtocolError("hashed write answered without a digest")
        return pending.digest

    async def flush(self) -> None:
        await self._submit(p.Command.FLUSH, 0, 0)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self._submit(p.Command.TRIM, offset, length, flags=p.CommandFlag.FUA if fua else 0)

    async def write_zeroes(
        self, offset: int, length: int, *, no_hole: bool = False, fua: bool = False
    ) -> None:
        flags = (p.CommandFlag.NO_HOLE if no_hole else 0) | (p.CommandFlag.FUA if fua else 0)
        await self._submit(p.Command.WRITE_ZEROES, offset, length, flags=flags)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        """One BLOCK_STATUS request: the extents the server described, clipped to the range.

        The server may describe less than asked (never nothing); callers page.
        """
        if self._info.allocation_context is None:
            raise NbdProtocolError("server did not agree to base:allocation")
        pending = await self._submit(p.Command.BLOCK_STATUS, offset, length)
        return pending.extents

    async def checksum(self, offset: int, length: int) -> bytes:
        """Ferry's checksum of a range, computed by the server (see ``protocol``)."""
        if self._info.checksum_context is None:
            raise NbdProtocolError(f"server did not agree to {p.FERRY_CHECKSUM_CONTEXT}")
        pending = await self._submit(p.Command.FERRY_CHECKSUM, offset, length)
        if pending.digest is None:
            raise NbdProtocolError("checksum reply without a digest")
        return pending.digest

    async def checksum_blocks(self, offset: int, length: int, block: int) -> list[bytes]:
        """Ferry's checksum of each ``block`` of a range (the last one clipped), in one request."""
        if self._info.checksum_context is None:
            raise NbdProtocolError(f"server did not agree to {p.FERRY_CHECKSUM_CONTEXT}")
        flags = p.ferry_block_flags(block)
        pending = await self._submit(p.Command.FERRY_CHECKSUM, offset, length, flags=flags)
        if pending.digest is None:
            raise NbdProtocolError("checksum reply without digests")
        digests = pending.digest
        return [digests[at : at + DIGEST_SIZE] for at in range(0, len(digests), DIGEST_SIZE)]

    async def close(self) -> None:
        """Wait for requests in flight (bounded), say NBD_CMD_DISC, close the socket.

        The socket is closed whatever happens on the way, a cancellation of this close
        included (a caller's timeout, a stop): a client closed is never left to the garbage
        collector with its socket open."""
        try:
            if self._failure is None:
                futures = [pending.future for pending in self._pending.values()]
                if futures:
                    await asyncio.wait(futures, timeout=CLOSE_TIMEOUT)
                with contextlib.suppress(ConnectionDropped):
                    disc = p.pack_request(p.Command.DISC, next(self._handles), 0, 0)
                    await self._channel.send(disc)
            self._fail(ConnectionDropped(self.peer, "client closed the connection"))
            self._channel.shutdown()
            if not self._reader.done():
                self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        finally:
            self._fail(ConnectionDropped(self.peer, "client closed the connection"))
            if not self._reader.done():
                self._reader.cancel()
            self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # Sending.

    async def _submit(
        self,
        command: p.Command,
        offset: int,
        length: int,
        *,
        flags: int = 0,
        payload: Buffer | None = None,
        buffer: memoryview | None = None,
    ) -> _Pending:
        if self._failure is not None:
            raise _copy(self._failure, self.peer)
        handle = next(self._handles)
        future = asyncio.get_running_loop().create_future()
        pending = _Pending(command, flags, offset, length, future)
        pending.buffer = buffer
        self._pending[handle] = pending
        header = p.pack_request(command, handle, offset, length, flags)
        try:
            await (self._channel.send(header, payload) if payload else self._channel.send(header))
        except ConnectionDropped as exc:
            # The link is gone for every request, not just this one: fail fast, reconnect next.
            self._pending.pop(handle, None)
            self._fail(exc)
            self._channel.shutdown()
            raise
        except BaseException:
            self._pending.pop(handle, None)
            raise
        await pending.future
        return pending

    # Receiving (the reader task).

    async def _read_replies(self) -> None:
        failure: ConnectionDropped | NbdProtocolError = ConnectionDropped(
            self.peer, "reader stopped"
        )
        try:
            while True:
                (magic,) = p.U32.unpack(await self._channel.read_exactly(4))
                if magic == p.SIMPLE_REPLY_MAGIC:
                    await self._simple_reply()
                elif magic == p.STRUCTURED_REPLY_MAGIC:
                    await self._structured_chunk()
                else:
                    raise NbdProtocolError(f"bad reply magic {magic:#x}")
        except asyncio.CancelledError:
            failure = ConnectionDropped(self.peer, "client closed the connection")
            raise
        except (ConnectionDropped, NbdProtocolError) as exc:
            failure = exc
        except Exception as exc:
            # Whatever else breaks the reader leaves the stream unusable all the same.
            failure = NbdProtocolError(f"unreadable reply: {exc!r}")
        finally:
            self._fail(failure)
            self._channel.shutdown()

    def _fail(self, failure: ConnectionDropped | NbdProtocolError) -> None:
        if self._failure is None:
            self._failure = failure
        pending, self._pending = self._pending, {}
        for request in pending.values():
            if not request.future.done():
                request.future.set_exception(_copy(failure, self.peer))

    def _find(self, handle: int) -> _Pending:
        # Stays registered until its reply is complete, so a failure mid-reply reaches it.
        pending = self._pending.get(handle)
        if pending is None:
            raise NbdProtocolError(f"reply for unknown handle {handle}")
        return pending

    async def _simple_reply(self) -> None:
        error, handle = p.SIMPLE_REPLY_TAIL.unpack(
            await self._channel.read_exactly(p.SIMPLE_REPLY_TAIL.size)
        )
        pending = self._find(handle)
        if pending.command == p.Command.READ and not error and pending.buffer is not None:
            await self._channel.read_into(pending.buffer)
            pending.received = len(pending.buffer)
        pending.error = error
        self._complete(handle, pending)

    async def _structured_chunk(self) -> None:
        flags, kind, handle, length = p.STRUCTURED_REPLY_TAIL.unpack(
            await self._channel.read_exactly(p.STRUCTURED_REPLY_TAIL.size)
        )
        done = bool(flags & p.ReplyFlag.DONE)
        pending = self._find(handle)
        if kind == p.ReplyType.OFFSET_DATA:
            await self._offset_data(pending, length)
        elif kind == p.ReplyType.OFFSET_HOLE:
            await self._offset_hole(pending, length)
        elif kind == p.ReplyType.BLOCK_STATUS:
            await self._block_status_chunk(pending, length)
        elif kind in (p.ReplyType.FERRY_CHECKSUM, p.ReplyType.FERRY_WRITE_HASH):
            await self._digest_chunk(pending, kind, length)
        elif kind & p.REPLY_TYPE_ERROR_BIT:
            await self._error_chunk(pending, length)
        elif kind != p.ReplyType.NONE or length:
            raise NbdProtocolError(f"unexpected reply chunk type {kind} ({length} bytes)")
        if done:
            if pending.command == p.Command.READ and not pending.error:
                if pending.received != pending.length:
                    raise NbdProtocolError(
                        f"read of {pending.length} bytes answered with {pending.received}"
                    )
            self._complete(handle, pending)

    def _content_range(self, pending: _Pending, offset: int, length: int) -> int:
        """Where a content chunk lands in the read buffer, after checking it fits."""
        if pending.command != p.Command.READ or pending.buffer is None:
            raise NbdProtocolError("content chunk in reply to a non-read request")
        start = offset - pending.offset
        if start < 0 or length <= 0 or start + length > pending.length:
            raise NbdProtocolError(
                f"chunk {offset}+{length} outside read {pending.offset}+{pending.length}"
            )
        pending.received += length
        return start

    async def _offset_data(self, pending: _Pending, length: int) -> None:
        if length < 9:
            raise NbdProtocolError(f"data chunk of {length} bytes")
        (offset,) = p.U64.unpack(await self._channel.read_exactly(8))
        start = self._content_range(pending, offset, length - 8)
        assert pending.buffer is not None
        await self._channel.read_into(pending.buffer[start : start + length - 8])

    async def _offset_hole(self, pending: _Pending, length: int) -> None:
        if length != p.OFFSET_HOLE.size:
            raise NbdProtocolError(f"hole chunk of {length} bytes")
        offset, size = p.OFFSET_HOLE.unpack(await self._channel.read_exactly(length))
        start = self._content_range(pending, offset, size)
        assert pending.buffer is not None
        pending.buffer[start : start + size] = bytes(size)

    async def _block_status_chunk(self, pending: _Pending, length: int) -> None:
        if length < 12 or (length - 4) % 8 or length > MAX_STATUS_PAYLOAD:
            raise NbdProtocolError(f"block status chunk of {length} bytes")
        if pending.command != p.Command.BLOCK_STATUS:
            raise NbdProtocolError("block status chunk in reply to another request")
        payload = await self._channel.read_exactly(length)
        (context,) = p.U32.unpack_from(payload)
        if context == self._info.allocation_context:
            pending.extents = _allocation_extents(payload, pending.offset, pending.length)

    async def _digest_chunk(self, pending: _Pending, kind: int, length: int) -> None:
        """Ferry digests, only ever in reply to the request that asked for them."""
        expected = DIGEST_SIZE
        if kind == p.ReplyType.FERRY_CHECKSUM:
            asked = pending.command == p.Command.FERRY_CHECKSUM
            block = p.ferry_block_size(pending.flags)
            if block is not None:
                expected = DIGEST_SIZE * p.block_count(pending.length, block)
        else:
            asked = pending.command == p.Command.WRITE and bool(
                pending.flags & p.CommandFlag.FERRY_HASH
            )
        if length != expected or not asked or pending.digest is not None:
            raise NbdProtocolError(f"unexpected digest chunk {kind:#x} of {length} bytes")
        pending.digest = await self._channel.read_exactly(length)

    async def _error_chunk(self, pending: _Pending, length: int) -> None:
        if length < p.ERROR_HEADER.size:
            raise NbdProtocolError(f"error chunk of {length} bytes")
        payload = await self._channel.read_exactly(length)
        error, message_length = p.ERROR_HEADER.unpack_from(payload)
        if message_length > length - p.ERROR_HEADER.size:
            raise NbdProtocolError("error message longer than its chunk")
        # A zero or unknown error value still means failure; the spec says treat it as EINVAL.
        pending.error = pending.error or error or p.Errno.EINVAL

    def _complete(self, handle: int, pending: _Pending) -> None:
        del self._pending[handle]
        if pending.future.done():
            return  # the caller gave up (cancelled); the reply was consumed all the same
        if pending.error == p.Errno.ENOSPC and pending.command in _WRITING:
            # The server's disk is full: say so, by name; never worth retrying as such.
            volume = f"volume {self._info.name!r}" if self._info.name else self.peer
            pending.future.set_exception(OutOfSpace(volume, pending.length))
        elif pending.error:
            pending.future.set_exception(
                NbdCommandError(
                    _command_name(pending.command), pending.offset, pending.length, pending.error
                )
            )
        else:
            pending.future.set_result(None)


def _allocation_extents(payload: bytes, offset: int, length: int) -> list[Extent]:
    """``base:allocation`` descriptors as extents from ``offset``, clipped to ``length``."""
    extents: list[Extent] = []
    pos, end = offset, offset + length
    for size, status in p.BLOCK_DESCRIPTOR.iter_unpack(memoryview(payload)[4:]):
        if size == 0:
            raise NbdProtocolError("block status descriptor of length 0")
        size = min(size, end - pos)
        zero = bool(status & p.StateFlag.ZERO)
        # A hole that is not known to read as zeroes has undefined content: treat it as data.
        extents.append(Extent(pos, size, zero=zero, hole=zero and bool(status & p.StateFlag.HOLE)))
        pos += size
        if pos >= end:
            break
    return extents


def _copy(failure: ConnectionDropped | NbdProtocolError, peer: str) -> Exception:
    """A fresh exception per waiter, so tracebacks do not pile up on one object."""
    if isinstance(failure, NbdProtocolError):
        return NbdProtocolError(failure.reason)
    return ConnectionDropped(peer, failure.cause)
