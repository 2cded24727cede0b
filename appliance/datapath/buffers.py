"""Reusable byte buffers for payloads and chunks.

On Linux a fresh multi-MiB allocation is zero-filled and page-faulted every
time, which cost more CPU than the NBD protocol itself at 4 MiB requests, so
the NBD ends and the transfer engine recycle their buffers. A buffer comes
back to the pool only when no memoryview of it is alive: a task still
sending from it (or a worker thread still reading it) keeps it out of reuse.
Backends that can fill a caller's buffer (:class:`ReadsInto`) are read
straight into pooled buffers.

:class:`BufferBudget` bounds the chunk buffers a transfer engine holds; one
budget shared by every transfer of a process bounds their memory together,
however many migrations run at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from appliance.datapath.throttle import QueueDepthLimiter

POOL_MIN_BUFFER = 64 * 1024
POOL_MAX_BYTES = 32 * 1024 * 1024


@runtime_checkable
class ReadsInto(Protocol):
    """A backend that can read into a caller's buffer (file, memory and NBD backends can)."""

    async def read_into(self, offset: int, buffer: bytearray | memoryview) -> None: ...


@runtime_checkable
class ServesInline(Protocol):
    """A backend that can serve a small request at once, on the caller's thread.

    Each method does the whole request and returns True, or does nothing the
    caller can observe and returns False (too large, out of range, not in the
    page cache, any error): the caller then takes the ordinary async path,
    which reports errors. Worth it only when the work is a system call that
    will not wait on a disk: a thread hand-off costs more than the call.
    """

    def read_inline(self, offset: int, view: memoryview) -> bool: ...

    def write_inline(self, offset: int, data: memoryview) -> bool: ...


def exported(buffer: bytearray) -> bool:
    """True while some memoryview still refers to ``buffer``.

    A bytearray with live views refuses to resize; shrinking by one byte and
    growing back costs nothing (no reallocation) when it is free to move.
    """
    if not buffer:
        return False
    last = buffer[-1]
    try:
        del buffer[-1]
    except BufferError:
        return True
    buffer.append(last)
    return False


class BufferPool:
    """Reusable buffers: a fresh multi-MiB bytearray costs page faults every time.

    ``take`` returns a buffer at least ``length`` long (callers slice it);
    ``give`` takes it back unless someone kept a view on it, keeping at most
    ``max_bytes`` idle.
    """

    def __init__(self, max_bytes: int = POOL_MAX_BYTES) -> None:
        self._free: list[bytearray] = []
        self._free_bytes = 0
        self._max_bytes = max_bytes

    def take(self, length: int) -> bytearray:
        fitting = [buffer for buffer in self._free if len(buffer) >= length]
        if length < POOL_MIN_BUFFER or not fitting:
            return bytearray(length)
        buffer = min(fitting, key=len)
        self._free.remove(buffer)
        self._free_bytes -= len(buffer)
        return buffer

    def give(self, buffer: bytearray) -> None:
        if len(buffer) < POOL_MIN_BUFFER or exported(buffer):
            return
        if self._free_bytes + len(buffer) > self._max_bytes:
            return
        self._free.append(buffer)
        self._free_bytes += len(buffer)


class BufferBudget:
    """At most ``slots`` buffers held at once by everyone sharing it, idle ones reused.

    Each holder takes one buffer for one unit of work and gives it back, so
    holders never wait on each other while holding one: no deadlock. Every
    buffer is ``buffer_bytes`` long whatever the work asks for, so any idle one
    fits the next holder and at most ``slots`` of them ever exist: memory,
    held and idle together, stays at ``slots * buffer_bytes`` (plus what a
    cancelled send may pin a moment longer).
    """

    def __init__(self, slots: int, buffer_bytes: int) -> None:
        self._slots = QueueDepthLimiter(slots)
        self._buffer_bytes = buffer_bytes
        self._pool = BufferPool(max_bytes=slots * buffer_bytes)

    @contextlib.asynccontextmanager
    async def hold(self, length: int) -> AsyncIterator[memoryview]:
        """A writable view of ``length`` bytes, for as long as the block runs."""
        async with self._slots.slot():
            buffer = self._pool.take(max(length, self._buffer_bytes))
            view = memoryview(buffer)[:length]
            try:
                yield view
            finally:
                # Reused only if nothing kept a view (a request still sending, say).
                with contextlib.suppress(BufferError):
                    view.release()
                self._pool.give(buffer)
