"""Server side of the NBD transmission phase: one connection's requests, served concurrently.

One reader loop takes requests off the socket (a WRITE's payload included).
A small plain READ or WRITE (at most ``INLINE_MAX`` bytes, no flags) that the
backend can do at once (:class:`ServesInline`: a read the page cache holds,
a write into it) is served by the reader itself, with no task and no thread,
and its reply is added to a batch that goes out in one send when the reader
would otherwise wait for the peer (or the batch is full). Every other
request gets a task, at most ``max_inflight`` at a time; replies go out as
each finishes, possibly out of order, one whole reply at a time.
Errors the spec foresees are answered with its error values: EINVAL for
unknown commands or flags (Ferry's extension flag counts as unknown unless
its context was negotiated), oversized reads and reads past the end, ENOSPC
for writes past the end, EPERM on read-only exports; the inline path never
answers an error, it leaves such a request to the ordinary one. What cannot
be answered (bad magic, a WRITE payload over the maximum block size) closes
the connection. Nothing here logs on the hot path, and nothing hashes unless
asked: a hashed WRITE digests its payload as received, once the backend's
write returned; a checksum reads the range into a pooled buffer and hashes
it (:mod:`appliance.datapath.nbd.checksums`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import struct
from collections.abc import Awaitable, Callable

import structlog

from appliance.datapath.buffers import BufferPool, ReadsInto, ServesInline
from appliance.datapath.nbd import protocol as p
from appliance.datapath.nbd.channel import Channel
from appliance.datapath.nbd.checksums import digest_of, range_digest, range_digests, read_range
from appliance.datapath.nbd.server_handshake import (
    BASE_ALLOCATION_ID,
    FERRY_CHECKSUM_ID,
    Session,
)
from appliance.errors import ConnectionDropped, NbdProtocolError
from appliance.storage.extents import Extent

log = structlog.get_logger(__name__)

MAX_DESCRIPTORS = 64 * 1024  # per BLOCK_STATUS reply; the client asks again for the rest
DRAIN_TIMEOUT = 10.0
INLINE_MAX = 64 * 1024
"""READs and WRITEs up to this size are offered to the backend's inline fast path."""
BATCH_BYTES = 256 * 1024
"""Inline replies are sent once this much is batched (or the reader would wait)."""
_READ_HEAD = struct.Struct(">IHHQIQ")  # structured reply header + OFFSET_DATA's offset
STRUCTURED_READ_HEAD = _READ_HEAD.size

_F = p.CommandFlag
ALLOWED_FLAGS = {
    p.Command.READ: _F.FUA | _F.DF,
    p.Command.WRITE: _F.FUA,
    p.Command.FLUSH: _F.FUA,
    p.Command.TRIM: _F.FUA,
    p.Command.WRITE_ZEROES: _F.FUA | _F.NO_HOLE,
    p.Command.BLOCK_STATUS: _F.FUA | _F.REQ_ONE,
    p.Command.FERRY_CHECKSUM: _F.FUA,
}

_ERRNO_MAP = {
    errno.EPERM: p.Errno.EPERM,
    errno.EACCES: p.Errno.EPERM,
    errno.EROFS: p.Errno.EPERM,
    errno.ENOSPC: p.Errno.ENOSPC,
    errno.EDQUOT: p.Errno.ENOSPC,
    errno.EFBIG: p.Errno.ENOSPC,
    errno.EINVAL: p.Errno.EINVAL,
    errno.ENOMEM: p.Errno.ENOMEM,
}


# Extension flags, allowed only once the Ferry context was negotiated.
FERRY_FLAGS = {
    p.Command.WRITE: _F.FERRY_HASH,
    p.Command.FERRY_CHECKSUM: _F.FERRY_BLOCKS | p.FERRY_BLOCK_SHIFT,
}


def allowed_flags(contexts: frozenset[int]) -> dict[int, int]:
    """Command flags a session may use: the standard ones, plus Ferry's if it opted in."""
    allowed: dict[int, int] = {command: int(flags) for command, flags in ALLOWED_FLAGS.items()}
    if FERRY_CHECKSUM_ID in contexts:
        for command, flags in FERRY_FLAGS.items():
            allowed[command] |= flags
    return allowed


class CommandError(Exception):
    """A request answered with an NBD error value instead of success."""

    def __init__(self, error: p.Errno, message: str) -> None:
        super().__init__(message)
        self.error = error
        self.message = message


def wire_errno(exc: BaseException) -> p.Errno:
    if isinstance(exc, OSError) and exc.errno is not None:
        return _ERRNO_MAP.get(exc.errno, p.Errno.EIO)
    if isinstance(exc, ValueError):
        return p.Errno.EINVAL
    return p.Errno.EIO


class ServerConnection:
    def __init__(
        self,
        channel: Channel,
        session: Session,
        *,
        max_block: int,
        max_inflight: int,
        buffers: BufferPool | None = None,
    ) -> None:
        self._channel = channel
        self._session = session
        self._backend = session.export.backend
        self._size = session.export.backend.size
        self._max_block = max_block
        self._slots = asyncio.Semaphore(max_inflight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._buffers = buffers or BufferPool()
        self._allowed_flags = allowed_flags(session.contexts)
        backend = self._backend
        # Protocol checks are slow: done once per connection, not per request.
        self._reader = backend if isinstance(backend, ReadsInto) else None
        writable = not session.export.readonly
        self._inline = backend if isinstance(backend, ServesInline) else None
        self._inline_writes = self._inline if writable else None
        self._read_head = STRUCTURED_READ_HEAD if session.structured else p.SIMPLE_REPLY.size
        self._batch = bytearray(BATCH_BYTES + INLINE_MAX + STRUCTURED_READ_HEAD)
        self._batch_view = memoryview(self._batch)
        self._batched = 0
        self._handlers: dict[int, Callable[[p.Request, memoryview | None], Awaitable[None]]] = {
            p.Command.READ: self._read,
            p.Command.WRITE: self._write,
            p.Command.FLUSH: self._flush,
            p.Command.TRIM: self._trim,
            p.Command.WRITE_ZEROES: self._write_zeroes,
            p.Command.BLOCK_STATUS: self._block_status,
            p.Command.FERRY_CHECKSUM: self._checksum,
        }

    async def serve(self) -> None:
        """Serve requests until NBD_CMD_DISC, end of stream, or a protocol violation."""
        try:
            while await self._next_request():
                pass
        finally:
            try:
                with contextlib.suppress(ConnectionDropped, TimeoutError):
                    async with asyncio.timeout(DRAIN_TIMEOUT):
                        await self._send_batch()
            finally:
                await self._drain()

    async def _next_request(self) -> bool:
        channel = self._channel
        header = channel.peek(p.REQUEST.size)
        if header is None:
            await self._send_batch()  # about to wait for the peer: answer what is done first
            header = memoryview(await channel.read_exactly(p.REQUEST.size))
        else:
            channel.skip(p.REQUEST.size)
        request = p.parse_request(header)
        if request.command == p.Command.DISC:
            return False
        if self._serve_inline(request):
            return True
        if self._slots.locked():
            await self._send_batch()
        await self._slots.acquire()
        try:
            payload = await self._payload(request)
        except BaseException:
            self._slots.release()
            raise
        if payload is not None and self._write_inline(request, memoryview(payload)):
            self._slots.release()
            self._buffers.give(payload)
            return True
        task = asyncio.create_task(self._serve_request(request, payload))
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return True

    async def _payload(self, request: p.Request) -> bytearray | None:
        if request.command != p.Command.WRITE:
            return None
        if request.length > self._max_block:
            raise NbdProtocolError(
                f"write of {request.length} bytes exceeds the maximum block {self._max_block}"
            )
        if self._channel.buffered < request.length:
            await self._send_batch()
        payload = self._buffers.take(request.length)
        await self._channel.read_into(memoryview(payload)[: request.length])
        return payload

    # The inline fast path: a small READ the page cache holds, or a small WRITE, done
    # at once by the reader (no task, no thread) and answered into the reply batch,
    # which goes out in one send when the reader would wait for the peer.

    def _serve_inline(self, request: p.Request) -> bool:
        """Serve ``request`` now if it is a small plain READ or WRITE the backend can do
        inline; False leaves it (and a WRITE's payload) for the ordinary path."""
        if request.flags or request.length > INLINE_MAX or self._inline is None:
            return False
        if self._batched >= BATCH_BYTES:
            return False  # the ordinary path sends the batch before it waits
        if request.command == p.Command.READ:
            return self._read_inline(request, self._inline)
        if request.command == p.Command.WRITE:
            data = self._channel.peek(request.length)
            if data is not None and self._write_inline(request, data):
                self._channel.skip(request.length)
                return True
        return False

    def _read_inline(self, request: p.Request, backend: ServesInline) -> bool:
        offset, length = request.offset, request.length
        if not length or p.overflows(offset, length, self._size):
            return False
        at = self._batched
        start = at + self._read_head
        if not backend.read_inline(offset, self._batch_view[start : start + length]):
            return False
        if self._read_head == p.SIMPLE_REPLY.size:
            p.SIMPLE_REPLY.pack_into(self._batch, at, p.SIMPLE_REPLY_MAGIC, 0, request.handle)
        else:
            _READ_HEAD.pack_into(
                self._batch,
                at,
                p.STRUCTURED_REPLY_MAGIC,
                p.ReplyFlag.DONE,
                p.ReplyType.OFFSET_DATA,
                request.handle,
                8 + length,
                offset,
            )
        self._batched = start + length
        return True

    def _write_inline(self, request: p.Request, payload: memoryview) -> bool:
        """Write ``payload`` (at least ``request.length`` long) now if the backend can."""
        backend = self._inline_writes
        offset, length = request.offset, request.length
        if (
            backend is None
            or request.flags
            or length > INLINE_MAX
            or self._batched >= BATCH_BYTES
            or p.overflows(offset, length, self._size)
        ):
            return False
        try:
            if not backend.write_inline(offset, payload[:length]):
                return False
        except OSError:
            # A full disk (ENOSPC) must not end the connection: the ordinary path does the
            # write again and answers its errno, a clear error the client can act on.
            return False
        at = self._batched
        p.SIMPLE_REPLY.pack_into(self._batch, at, p.SIMPLE_REPLY_MAGIC, 0, request.handle)
        self._batched = at + p.SIMPLE_REPLY.size
        return True

    async def _send_batch(self) -> None:
        """Send the replies of the requests served inline, in one system call."""
        if self._batched:
            batched, self._batched = self._batched, 0
            await self._channel.send(self._batch_view[:batched])

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def _drain(self) -> None:
        """Let requests in flight finish (the spec asks it on DISC and shutdown)."""
        if not self._tasks:
            return
        _, late = await asyncio.wait(set(self._tasks), timeout=DRAIN_TIMEOUT)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late)

    async def _serve_request(self, request: p.Request, payload: bytearray | None) -> None:
        view = None if payload is None else memoryview(payload)[: request.length]
        await self._dispatch(request, view)
        if payload is not None and view is not None:
            # Not on cancellation: a backend thread might still be reading the buffer.
            try:
                view.release()
            except BufferError:
                return  # still in use somewhere: leave it to the garbage collector
            self._buffers.give(payload)

    async def _dispatch(self, request: p.Request, payload: memoryview | None) -> None:
        try:
            handler = self._handlers.get(request.command)
            if handler is None:
                raise CommandError(p.Errno.EINVAL, f"unknown command {request.command}")
            if request.flags & ~self._allowed_flags[request.command]:
                raise CommandError(p.Errno.EINVAL, f"bad flags {request.flags:#x}")
            await handler(request, payload)
        except ConnectionDropped:
            return
        except CommandError as exc:
            await self._reply_error(request, exc.error, exc.message)
        except Exception as exc:
            log.warning(
                "nbd request failed",
                peer=self._channel.peer,
                command=request.command,
                offset=request.offset,
                length=request.length,
                error=repr(exc),
            )
            await self._reply_error(request, wire_errno(exc), str(exc))

    async def _reply_error(self, request: p.Request, error: p.Errno, message: str) -> None:
        try:
            if self._session.structured:
                await self._channel.send(p.pack_error_chunk(request.handle, error, message))
            else:
                await self._channel.send(
                    p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, error, request.handle)
                )
        except ConnectionDropped:
            pass

    async def _reply_ok(self, request: p.Request) -> None:
        await self._channel.send(p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, request.handle))

    def _check_range(self, request: p.Request, past_end: p.Errno) -> None:
        if p.overflows(request.offset, request.length, self._size):
            raise CommandError(
                past_end, f"{request.offset}+{request.length} is past the end ({self._size})"
            )

    def _check_writable(self) -> None:
        if self._session.export.readonly:
            raise CommandError(p.Errno.EPERM, "export is read-only")

    def _check_max(self, request: p.Request) -> None:
        if request.length > self._max_block:
            raise CommandError(p.Errno.EINVAL, f"request exceeds {self._max_block} bytes")

    async def _fua(self, request: p.Request) -> None:
        if request.flags & p.CommandFlag.FUA:
            await self._backend.flush()

    async def _read(self, request: p.Request, _: memoryview | None) -> None:
        self._check_max(request)
        self._check_range(request, p.Errno.EINVAL)
        buffer = self._buffers.take(request.length)
        data = memoryview(buffer)[: request.length]
        try:
            if self._reader is not None:
                await self._reader.read_into(request.offset, data)
            else:
                await read_range(self._backend, request.offset, data)
            await self._send_data(request, data)
        finally:
            # Not reused while a view lives on (a send cut short, say).
            with contextlib.suppress(BufferError):
                data.release()
            self._buffers.give(buffer)

    async def _send_data(self, request: p.Request, data: memoryview) -> None:
        if not self._session.structured:
            header = p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, request.handle)
            await self._channel.send(header, data)
        elif request.length == 0:
            header = p.pack_structured_header(p.ReplyFlag.DONE, p.ReplyType.NONE, request.handle, 0)
            await self._channel.send(header)
        else:
            header = p.pack_structured_header(
                p.ReplyFlag.DONE, p.ReplyType.OFFSET_DATA, request.handle, 8 + len(data)
            )
            await self._channel.send(header + p.U64.pack(request.offset), data)

    async def _write(self, request: p.Request, payload: memoryview | None) -> None:
        self._check_writable()
        self._check_range(request, p.Errno.ENOSPC)
        assert payload is not None
        await self._backend.write(request.offset, payload)
        if not request.flags & p.CommandFlag.FERRY_HASH:
            await self._fua(request)
            await self._reply_ok(request)
            return
        # The bytes as received, hashed only now that the write succeeded.
        digest = await digest_of(payload)
        await self._fua(request)
        header = p.pack_structured_header(
            p.ReplyFlag.DONE, p.ReplyType.FERRY_WRITE_HASH, request.handle, len(digest)
        )
        await self._channel.send(header + digest)

    async def _flush(self, request: p.Request, _: memoryview | None) -> None:
        await self._backend.flush()
        await self._reply_ok(request)

    async def _trim(self, request: p.Request, _: memoryview | None) -> None:
        self._check_writable()
        self._check_range(request, p.Errno.EINVAL)
        await self._backend.zero(request.offset, request.length, punch_hole=True)
        await self._fua(request)
        await self._reply_ok(request)

    async def _write_zeroes(self, request: p.Request, _: memoryview | None) -> None:
        self._check_writable()
        self._check_range(request, p.Errno.ENOSPC)
        punch_hole = not request.flags & p.CommandFlag.NO_HOLE
        await self._backend.zero(request.offset, request.length, punch_hole=punch_hole)
        await self._fua(request)
        await self._reply_ok(request)

    async def _block_status(self, request: p.Request, _: memoryview | None) -> None:
        contexts = self._session.contexts
        if not contexts:
            raise CommandError(p.Errno.EINVAL, "no metadata context was negotiated")
        if request.length == 0:
            raise CommandError(p.Errno.EINVAL, "empty block status request")
        self._check_range(request, p.Errno.EINVAL)
        chunks: list[bytes] = []
        if BASE_ALLOCATION_ID in contexts:
            extents = await self._backend.extents(request.offset, request.length)
            limit = 1 if request.flags & p.CommandFlag.REQ_ONE else MAX_DESCRIPTORS
            # A backend that cannot tell reports nothing: status 0 (data) is always safe.
            extents = extents or [Extent(request.offset, request.length)]
            chunks.append(allocation_payload(extents[:limit]))
        if FERRY_CHECKSUM_ID in contexts:
            # The checksum context has no per-block status; the spec wants a chunk anyway.
            chunks.append(
                p.U32.pack(FERRY_CHECKSUM_ID) + p.BLOCK_DESCRIPTOR.pack(request.length, 0)
            )
        buffers: list[bytes] = []
        for index, payload in enumerate(chunks):
            flags = p.ReplyFlag.DONE if index == len(chunks) - 1 else 0
            buffers.append(
                p.pack_structured_header(
                    flags, p.ReplyType.BLOCK_STATUS, request.handle, len(payload)
                )
            )
            buffers.append(payload)
        await self._channel.send(*buffers)

    async def _checksum(self, request: p.Request, _: memoryview | None) -> None:
        if FERRY_CHECKSUM_ID not in self._session.contexts:
            raise CommandError(p.Errno.EINVAL, f"{p.FERRY_CHECKSUM_CONTEXT} was not negotiated")
        self._check_max(request)
        self._check_range(request, p.Errno.EINVAL)
        try:
            block = p.ferry_block_size(request.flags)
        except ValueError as exc:
            raise CommandError(p.Errno.EINVAL, str(exc)) from None
        offset, length = request.offset, request.length
        if block is None:
            digests = await range_digest(self._backend, offset, length, self._buffers)
        else:
            digests = b"".join(
                await range_digests(self._backend, offset, length, block, self._buffers)
            )
        header = p.pack_structured_header(
            p.ReplyFlag.DONE, p.ReplyType.FERRY_CHECKSUM, request.handle, len(digests)
        )
        await self._channel.send(header, digests)


def allocation_payload(extents: list[Extent]) -> bytes:
    """A ``base:allocation`` BLOCK_STATUS payload: context id, then (length, flags) pairs."""
    descriptors = b"".join(
        p.BLOCK_DESCRIPTOR.pack(e.length, p.status_flags(e.zero, e.hole))
        for e in extents
        if e.length
    )
    return p.U32.pack(BASE_ALLOCATION_ID) + descriptors
