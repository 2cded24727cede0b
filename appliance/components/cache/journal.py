"""The cache's write-ahead metadata journal: checksummed records, replayed on open.

File format (``journal`` in a disk's cache directory)::

    header   8 bytes  b"FRYCJNL1"
    record*  u32 payload length | u32 crc32(payload) | payload      (big-endian)
    payload  u8 kind | fields (struct formats in ``_FORMATS``)

Record kinds (what ``CacheStore`` replays, in order):

    MAP      chunk:u64 slot:u32 epoch:u32   chunk lives in slot; epoch 0 = clean,
                                            N > 0 = dirty in epoch N (and so written)
    UNMAP    chunk:u64                      chunk evicted (its slot is free)
    CUT      epoch:u32                      epoch N cut: every live chunk dirty in N is
                                            held by N; writes now go to N + 1
    COMMIT   epoch:u32                      N committed on-prem: its chunks are clean
    HELD     epoch:u32 chunk:u64 slot:u32   (compaction) chunk of cut epoch N in slot
    STATE    open:u32 committed:u32         (compaction, first record) epoch numbers
    WRITTEN  first:u64 bitmap bytes         (compaction) chunks written since the
                                            migration began, bit i = chunk first + i

Replay reads records until the end or the first short or corrupt record (a
torn tail from a crash mid-append), and the file is cut back to that point.
Records reach the file only in ``append`` (called by the store's sync, after
the slot file's data was fsynced), so a record never points at data that is
not durable. ``rewrite`` compacts: the whole state as records into
``journal.new``, fsync, rename over ``journal``, fsync the directory.
"""

from __future__ import annotations

import enum
import os
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"FRYCJNL1"
_FRAME = struct.Struct(">II")


class Kind(enum.IntEnum):
    MAP = 1
    UNMAP = 2
    CUT = 3
    COMMIT = 4
    HELD = 5
    STATE = 6
    WRITTEN = 7


_FORMATS: dict[Kind, struct.Struct] = {
    Kind.MAP: struct.Struct(">QII"),
    Kind.UNMAP: struct.Struct(">Q"),
    Kind.CUT: struct.Struct(">I"),
    Kind.COMMIT: struct.Struct(">I"),
    Kind.HELD: struct.Struct(">IQI"),
    Kind.STATE: struct.Struct(">II"),
    Kind.WRITTEN: struct.Struct(">Q"),
}


@dataclass(frozen=True, slots=True)
class Record:
    kind: Kind
    fields: tuple[int, ...]
    blob: bytes = b""


def encode(record: Record) -> bytes:
    payload = bytes([record.kind]) + _FORMATS[record.kind].pack(*record.fields) + record.blob
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def _decode(payload: bytes) -> Record | None:
    try:
        kind = Kind(payload[0])
    except (ValueError, IndexError):
        return None
    fmt = _FORMATS[kind]
    if len(payload) < 1 + fmt.size or (kind != Kind.WRITTEN and len(payload) != 1 + fmt.size):
        return None
    fields = fmt.unpack_from(payload, 1)
    return Record(kind, tuple(int(field) for field in fields), payload[1 + fmt.size :])


def _records(data: bytes) -> Iterator[tuple[Record, int]]:
    """Each good record with the offset just past it; stops at the first bad one."""
    pos = len(MAGIC)
    while pos + _FRAME.size <= len(data):
        length, crc = _FRAME.unpack_from(data, pos)
        start = pos + _FRAME.size
        payload = data[start : start + length]
        if len(payload) != length or zlib.crc32(payload) != crc:
            return
        record = _decode(payload)
        if record is None:
            return
        pos = start + length
        yield record, pos


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """Appends and replays one disk's records; not safe for two processes at once."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd = -1
        self.records_since_rewrite = 0

    def open(self) -> list[Record]:
        """Open (creating if absent) and return every good record; cut a torn tail."""
        if not self._path.exists():
            self.rewrite([])
        data = self._path.read_bytes()
        if not data.startswith(MAGIC):
            self.rewrite([])
            data = MAGIC
        records: list[Record] = []
        end = len(MAGIC)
        for record, after in _records(data):
            records.append(record)
            end = after
        self._fd = os.open(self._path, os.O_WRONLY)
        if end != len(data):
            os.ftruncate(self._fd, end)
            os.fsync(self._fd)
        os.lseek(self._fd, end, os.SEEK_SET)
        self.records_since_rewrite = len(records)
        return records

    def append(self, records: Iterable[Record]) -> None:
        """Write and fdatasync (blocking: call it in a thread); the size counts as data."""
        data = b"".join(encode(record) for record in records)
        if not data:
            return
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        os.fdatasync(self._fd)

    def rewrite(self, records: Iterable[Record]) -> None:
        """Replace the whole journal by ``records``, atomically (blocking)."""
        fresh = self._path.with_name(self._path.name + ".new")
        items = list(records)
        with fresh.open("wb") as file:
            file.write(MAGIC)
            file.write(b"".join(encode(record) for record in items))
            file.flush()
            os.fsync(file.fileno())
        os.replace(fresh, self._path)
        _fsync_dir(self._path.parent)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = os.open(self._path, os.O_WRONLY)
            os.lseek(self._fd, 0, os.SEEK_END)
        self.records_since_rewrite = len(items)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
