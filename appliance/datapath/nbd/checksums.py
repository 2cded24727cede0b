"""Reading and hashing ranges of a backend for the NBD server: checksums and hashed writes.

Up to a MiB is hashed on the event loop (cheaper than a hand-off to a
thread), more in a thread (xxh3 releases the GIL). A checksum of a large
range looks at the extent map first, so holes are hashed unread.
"""

from __future__ import annotations

import asyncio
import contextlib

from appliance.datapath.buffers import BufferPool, ReadsInto
from appliance.storage.backend import Backend, HashesBlocks
from appliance.storage.hashing import chunk_hash, zero_hash

INLINE_HASH_LIMIT = 1 << 20
"""Hash up to this many bytes on the event loop: cheaper than a hand-off to a thread."""
MAP_FIRST_LENGTH = 4 << 20
"""Checksum ranges this large look at the extent map first, to hash holes unread. A map
lookup costs about what reading a MiB of hole (zero-filled by the kernel) does."""


async def read_range(backend: Backend, offset: int, view: memoryview) -> None:
    """Fill ``view`` from ``offset``: straight into it when the backend can."""
    if isinstance(backend, ReadsInto):
        await backend.read_into(offset, view)
    else:
        view[:] = await backend.read(offset, len(view))


async def digest_of(data: memoryview) -> bytes:
    """chunk_hash of ``data``; large buffers are hashed in a thread (xxh3 drops the GIL)."""
    if len(data) <= INLINE_HASH_LIMIT:
        return chunk_hash(data)
    return await asyncio.get_running_loop().run_in_executor(None, chunk_hash, data)


async def range_digests(
    backend: Backend, offset: int, length: int, block: int, buffers: BufferPool
) -> list[bytes]:
    """chunk_hash of each ``block`` of the range: by the backend where it can, else read
    and hashed here a block at a time, so a request holds one block's buffer, not the
    whole range's (eight migrations checking their images at once add up)."""
    if isinstance(backend, HashesBlocks):
        digests = await backend.hash_blocks(offset, length, block)
        if digests is not None:
            return digests
    if length >= MAP_FIRST_LENGTH:
        extents = await backend.extents(offset, length)
        if all(extent.zero for extent in extents):
            ends = range(offset + block, offset + length + block, block)
            return [zero_hash(min(end, offset + length) - end + block) for end in ends]
    end = offset + length
    buffer = buffers.take(min(block, length))
    digests = []
    try:
        for at in range(offset, end, block):
            view = memoryview(buffer)[: min(block, end - at)]
            try:
                await read_range(backend, at, view)
                digests.append(await digest_of(view))
            finally:
                with contextlib.suppress(BufferError):
                    view.release()
    finally:
        buffers.give(buffer)
    return digests


async def range_digest(backend: Backend, offset: int, length: int, buffers: BufferPool) -> bytes:
    """chunk_hash of the range as it reads; a large range known to be all zero is not read."""
    if length >= MAP_FIRST_LENGTH:
        extents = await backend.extents(offset, length)
        if all(extent.zero for extent in extents):
            return zero_hash(length)
    buffer = buffers.take(length)
    view = memoryview(buffer)[:length]
    try:
        await read_range(backend, offset, view)
        return await digest_of(view)
    finally:
        with contextlib.suppress(BufferError):
            view.release()
        buffers.give(buffer)
