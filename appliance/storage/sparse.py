"""Blocking primitives on sparse raw files, for worker threads only.

Positional I/O (``pread``/``pwrite``) never moves a shared file offset, so
one descriptor serves many threads. Allocation comes from
``SEEK_DATA``/``SEEK_HOLE``; punching holes uses ``fallocate(2)``, with a
fallback to writing zeroes where the file system cannot punch.
"""

from __future__ import annotations

import ctypes
import errno
import os

_PUNCH_HOLE = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
_COPY_PIECE = 8 * 1024 * 1024
_ZEROES = bytes(1024 * 1024)

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
_fallocate.restype = ctypes.c_int

Allocation = tuple[int, int, bool]
"""``(start, end, is_data)``: a run of a file that is allocated (data) or a hole."""


def create(path: os.PathLike[str], size: int) -> None:
    """A new file of ``size`` bytes, all hole; fails if it exists."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_exact(fd: int, offset: int, length: int) -> bytes:
    """``length`` bytes at ``offset``; the file is never shorter than the disk."""
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]
    done = len(data)
    while done < length:
        more = os.pread(fd, length - done, offset + done)
        if not more:
            raise OSError(errno.EIO, f"short read at {offset + done}: the file ends early")
        parts.append(more)
        done += len(more)
    return b"".join(parts)


def read_exact_into(fd: int, offset: int, view: memoryview) -> None:
    """Fill ``view`` from ``offset``; the file is never shorter than the disk."""
    while view:
        count = os.preadv(fd, [view], offset)
        if not count:
            raise OSError(errno.EIO, f"short read at {offset}: the file ends early")
        view = view[count:]
        offset += count


def write_all(fd: int, offset: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def punch(fd: int, offset: int, length: int) -> None:
    """Make ``[offset, offset + length)`` read as zeroes, releasing the space where possible."""
    if length <= 0:
        return
    if _fallocate(fd, _PUNCH_HOLE, offset, length) == 0:
        return
    code = ctypes.get_errno()
    if code not in (errno.EOPNOTSUPP, errno.ENOSYS):
        raise OSError(code, os.strerror(code))
    end = offset + length
    while offset < end:
        piece = min(len(_ZEROES), end - offset)
        write_all(fd, offset, memoryview(_ZEROES)[:piece])
        offset += piece


def allocation(fd: int, start: int, end: int) -> list[Allocation]:
    """The data and hole runs of ``[start, end)``, in order, covering it exactly."""
    runs: list[Allocation] = []
    position = start
    while position < end:
        try:
            data = min(os.lseek(fd, position, os.SEEK_DATA), end)
        except OSError as error:
            if error.errno != errno.ENXIO:
                raise
            data = end  # nothing but hole up to the end of the file
        if data > position:
            runs.append((position, data, False))
        if data >= end:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        runs.append((data, hole, True))
        position = hole
    return runs


def copy(source: int, target: int, start: int, end: int) -> None:
    """Copy ``[start, end)`` between two files at the same offsets, in bounded pieces."""
    position = start
    while position < end:
        length = min(_COPY_PIECE, end - position)
        try:
            copied = os.copy_file_range(source, target, length, position, position)
        except OSError as error:
            if error.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            copied = 0
        if copied <= 0:
            write_all(target, position, read_exact(source, position, length))
            copied = length
        position += copied
