"""A block backend over a raw, sparse file.

Every system call runs in the backend's own small thread pool so the event
loop never waits on the disk, except for the inline fast paths an NBD server
uses for small requests: a read of at most ``INLINE_LIMIT`` bytes the page
cache holds entirely (``preadv2(RWF_NOWAIT)``, which refuses rather than
waits) and a write of at most ``INLINE_LIMIT`` bytes, which lands in the page
cache; a thread hand-off costs several times either system call. The allocation map comes from
``SEEK_DATA``/``SEEK_HOLE``, walked to the end of the requested range.
Zeroing prefers ``fallocate`` (``PUNCH_HOLE`` to deallocate, ``ZERO_RANGE``
to keep the space) and falls back to writing zeroes where the file system
has neither; a mode found unsupported once is not tried again.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

from appliance.storage.extents import Extent
from appliance.storage.hashing import chunk_hash

DEFAULT_WORKERS = 4
INLINE_LIMIT = 64 * 1024
"""Largest read or write the inline fast paths do on the caller's thread."""
HASH_PIECE = 1 << 20
"""hash_blocks reads this much at a time into one buffer, which stays in the CPU cache."""
_ZERO_BUFFER = bytes(1024 * 1024)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
_fallocate.restype = ctypes.c_int

_T = TypeVar("_T")


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2), which the os module only offers without a mode."""
    if _fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def check_range(name: str, size: int, offset: int, length: int) -> None:
    """Raise ValueError unless ``[offset, offset + length)`` lies inside ``size`` bytes."""
    if offset < 0 or length < 0 or offset + length > size:
        raise ValueError(f"{name}: range {offset}+{length} is outside a disk of {size} bytes")


def read_only_error(name: str) -> PermissionError:
    return PermissionError(errno.EPERM, f"{name} is read-only")


class FileBackend:
    """A raw file as a fixed-size disk; build it with :meth:`open` or :meth:`create`."""

    def __init__(
        self, fd: int, path: Path, size: int, *, readonly: bool, workers: int = DEFAULT_WORKERS
    ) -> None:
        self._fd = fd
        self._path = path
        self._size = size
        self._readonly = readonly
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="file-io")
        self._unsupported_modes: set[int] = set()
        self._closed = False

    @classmethod
    def open(
        cls, path: Path | str, *, readonly: bool = False, workers: int = DEFAULT_WORKERS
    ) -> FileBackend:
        path = Path(path)
        fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, path, size, readonly=readonly, workers=workers)

    @classmethod
    def create(
        cls, path: Path | str, size: int, *, exist_ok: bool = False, workers: int = DEFAULT_WORKERS
    ) -> FileBackend:
        """A new sparse file of ``size`` bytes (all hole); an existing one is resized."""
        path = Path(path)
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (0 if exist_ok else os.O_EXCL)
        fd = os.open(path, flags, 0o600)
        try:
            os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, path, size, readonly=False, workers=workers)

    @property
    def name(self) -> str:
        return str(self._path)

    @property
    def path(self) -> Path:
        return self._path

    @property
    def size(self) -> int:
        return self._size

    @property
    def readonly(self) -> bool:
        return self._readonly

    async def _run(self, func: Callable[..., _T], *args: object) -> _T:
        if self._closed:
            raise ValueError(f"{self.name} is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, func, *args)

    async def read(self, offset: int, length: int) -> bytes:
        check_range(self.name, self._size, offset, length)
        return await self._run(self._read, offset, length)

    async def read_into(self, offset: int, buffer: bytearray | memoryview) -> None:
        """Fill ``buffer`` from ``offset`` (``read`` without allocating the result)."""
        view = memoryview(buffer).cast("B")
        check_range(self.name, self._size, offset, len(view))
        await self._run(self._read_into, offset, view)

    def read_inline(self, offset: int, view: memoryview) -> bool:
        """Fill ``view`` now if it is small and wholly in the page cache; else False and
        the caller uses :meth:`read_into`."""
        if self._closed or len(view) > INLINE_LIMIT or not 0 <= offset <= self._size - len(view):
            return False
        try:
            return os.preadv(self._fd, [view], offset, os.RWF_NOWAIT) == len(view)
        except OSError:
            return False  # EAGAIN: not cached; anything else is for the slow path to report

    def write_inline(self, offset: int, data: memoryview) -> bool:
        """Write a small ``data`` now (into the page cache); else False and the caller
        uses :meth:`write`. A short write is completed by the caller's :meth:`write`."""
        if (
            self._closed
            or self._readonly
            or len(data) > INLINE_LIMIT
            or not 0 <= offset <= self._size - len(data)
        ):
            return False
        try:
            return os.pwrite(self._fd, data, offset) == len(data)
        except OSError:
            return False

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        if self._readonly:
            raise read_only_error(self.name)
        check_range(self.name, self._size, offset, len(data))
        await self._run(self._write, offset, data)

    async def zero(self, offset: int, length: int, *, punch_hole: bool = False) -> None:
        if self._readonly:
            raise read_only_error(self.name)
        check_range(self.name, self._size, offset, length)
        if length:
            await self._run(self._zero, offset, length, punch_hole)

    async def hash_blocks(self, offset: int, length: int, block: int) -> list[bytes]:
        """chunk_hash of each ``block`` of the range, hashed in a worker thread as it reads."""
        check_range(self.name, self._size, offset, length)
        if block <= 0:
            raise ValueError(f"block size must be positive, got {block}")
        return await self._run(self._hash_blocks, offset, length, block)

    async def flush(self) -> None:
        if not self._readonly:
            await self._run(os.fdatasync, self._fd)

    async def extents(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        if length is None:
            length = self._size - offset
        check_range(self.name, self._size, offset, length)
        return await self._run(self._map, offset, offset + length)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Let running system calls finish before the descriptor can be reused.
        await asyncio.to_thread(self._executor.shutdown, wait=True)
        os.close(self._fd)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # Blocking parts, run in the thread pool.

    def _read(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) < length:
            # Only when the file was truncated under us: past its end reads as zeroes.
            data += bytes(length - len(data))
        return data

    def _read_into(self, offset: int, view: memoryview) -> None:
        while view:
            count = os.preadv(self._fd, [view], offset)
            if count == 0:
                view[:] = bytes(len(view))  # truncated under us: past the end reads as zeroes
                return
            view = view[count:]
            offset += count

    def _hash_blocks(self, offset: int, length: int, block: int) -> list[bytes]:
        if block > HASH_PIECE:
            return [
                chunk_hash(self._read(at, min(block, offset + length - at)))
                for at in range(offset, offset + length, block)
            ]
        buffer = memoryview(bytearray(HASH_PIECE // block * block))
        digests: list[bytes] = []
        for at in range(offset, offset + length, len(buffer)):
            piece = buffer[: min(len(buffer), offset + length - at)]
            self._read_into(at, piece)
            digests.extend(chunk_hash(piece[i : i + block]) for i in range(0, len(piece), block))
        return digests

    def _write(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            written = os.pwrite(self._fd, view, offset)
            view = view[written:]
            offset += written

    def _zero(self, offset: int, length: int, punch_hole: bool) -> None:
        modes = [FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE]
        if punch_hole:
            modes.insert(0, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
        for mode in modes:
            if mode in self._unsupported_modes:
                continue
            try:
                fallocate(self._fd, mode, offset, length)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                self._unsupported_modes.add(mode)
        self._write_zeroes(offset, length)

    def _write_zeroes(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            step = min(len(_ZERO_BUFFER), end - offset)
            self._write(offset, memoryview(_ZERO_BUFFER)[:step])
            offset += step

    def _map(self, start: int, end: int) -> list[Extent]:
        extents: list[Extent] = []
        pos = start
        while pos < end:
            data = self._seek(pos, os.SEEK_DATA, end)
            if data > pos:
                extents.append(Extent(pos, min(data, end) - pos, zero=True, hole=True))
            if data >= end:
                break
            hole = min(self._seek(data, os.SEEK_HOLE, end), end)
            extents.append(Extent(data, hole - data))
            pos = hole
        return extents

    def _seek(self, pos: int, whence: int, end: int) -> int:
        try:
            return os.lseek(self._fd, pos, whence)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                # No data after pos (SEEK_DATA), or pos is at or past the end of file.
                return end
            raise
