"""Block bitmaps: which fixed-size blocks of a disk a layer holds, and their file format.

A ``Bitmap`` is one bit per block, least significant bit first within each
byte (so ``int.from_bytes(bits, "little")`` numbers the bits like the blocks).
Set runs are found with a regular expression over the bytes, so a sparse map
of a large disk costs time in proportion to its set bytes, not its size.

On disk a bitmap is a small header (magic, version, granularity, block count,
CRC-32 of the bits) followed by the bits, always replaced atomically: written
to a temporary file, fsync'd, renamed over the old one, and the directory
fsync'd, so a crash leaves either the old or the new map, never a torn one.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from pathlib import Path

from appliance.errors import DiskCorrupt

_MAGIC = b"FERRYBM1"
_VERSION = 1
_HEADER = struct.Struct("<8sIIQI")  # magic, version, granularity, block count, crc32

_NONZERO_BYTES = re.compile(rb"[^\x00]+")
_FULL_BYTES = re.compile(rb"\xff+")


def _byte_runs(value: int) -> tuple[tuple[int, int], ...]:
    """The runs of set bits inside one byte, as ``(first bit, end bit)``."""
    runs: list[tuple[int, int]] = []
    bit = 0
    while bit < 8:
        if value >> bit & 1:
            start = bit
            while bit < 8 and value >> bit & 1:
                bit += 1
            runs.append((start, bit))
        else:
            bit += 1
    return tuple(runs)


_RUNS_IN_BYTE = tuple(_byte_runs(value) for value in range(256))


def _append_run(runs: list[tuple[int, int]], start: int, end: int) -> None:
    if runs and runs[-1][1] == start:
        runs[-1] = (runs[-1][0], end)
    else:
        runs.append((start, end))


def set_runs(bits: bytes | bytearray, nbits: int) -> list[tuple[int, int]]:
    """Runs ``(first, end)`` of set bits among the first ``nbits`` bits, in order, merged."""
    runs: list[tuple[int, int]] = []
    for match in _NONZERO_BYTES.finditer(bits):
        index, stop = match.start(), match.end()
        while index < stop:
            value = bits[index]
            if value == 0xFF:
                full = _FULL_BYTES.match(bits, index, stop)
                assert full is not None
                _append_run(runs, index * 8, full.end() * 8)
                index = full.end()
                continue
            for lo, hi in _RUNS_IN_BYTE[value]:
                _append_run(runs, index * 8 + lo, index * 8 + hi)
            index += 1
    # Bits past nbits are never set by Bitmap, but a mask built from ints may carry them.
    while runs and runs[-1][1] > nbits:
        start, _ = runs.pop()
        if start < nbits:
            runs.append((start, nbits))
    return runs


def int_runs(value: int, nbits: int) -> list[tuple[int, int]]:
    """Runs of set bits of a non-negative int used as a bitmap of ``nbits`` bits."""
    if value <= 0:
        return []
    return set_runs(value.to_bytes((value.bit_length() + 7) // 8, "little"), nbits)


def range_mask(first: int, end: int) -> int:
    """An int with bits ``[first, end)`` set."""
    if end <= first:
        return 0
    return ((1 << (end - first)) - 1) << first


class Bitmap:
    """One bit per block; mutated only from the event loop thread.

    ``generation`` counts mutations so a flush can tell whether the copy it
    persisted is still current.
    """

    __slots__ = ("_bits", "_nbits", "generation")

    def __init__(self, nbits: int, bits: bytes | bytearray | None = None) -> None:
        if nbits < 0:
            raise ValueError(f"negative bit count {nbits}")
        nbytes = (nbits + 7) // 8
        self._nbits = nbits
        self._bits = bytearray(bits) if bits is not None else bytearray(nbytes)
        if len(self._bits) != nbytes:
            raise ValueError(f"{len(self._bits)} bytes cannot hold exactly {nbits} bits")
        self.generation = 0

    @property
    def nbits(self) -> int:
        return self._nbits

    def __contains__(self, index: int) -> bool:
        return bool(self._bits[index >> 3] >> (index & 7) & 1)

    def set_range(self, first: int, end: int) -> None:
        self._change(first, end, set_bits=True)

    def clear_range(self, first: int, end: int) -> None:
        self._change(first, end, set_bits=False)

    def _change(self, first: int, end: int, *, set_bits: bool) -> None:
        if not 0 <= first <= end <= self._nbits:
            raise ValueError(f"bit range [{first}, {end}) outside {self._nbits} bits")
        if first == end:
            return
        self.generation += 1
        bits = self._bits
        index = first
        while index < end and index & 7:
            self._change_bit(index, set_bits)
            index += 1
        full_end = end & ~7
        if index < full_end:
            fill = b"\xff" if set_bits else b"\x00"
            bits[index >> 3 : full_end >> 3] = fill * ((full_end - index) >> 3)
            index = full_end
        while index < end:
            self._change_bit(index, set_bits)
            index += 1

    def _change_bit(self, index: int, set_bits: bool) -> None:
        if set_bits:
            self._bits[index >> 3] |= 1 << (index & 7)
        else:
            self._bits[index >> 3] &= ~(1 << (index & 7)) & 0xFF

    def update(self, other: Bitmap) -> None:
        """Set every bit that is set in ``other`` (a union)."""
        if other.nbits != self._nbits:
            raise ValueError(f"cannot merge {other.nbits} bits into {self._nbits}")
        self.generation += 1
        merged = self.as_int() | other.as_int()
        self._bits[:] = merged.to_bytes(len(self._bits), "little")

    def as_int(self) -> int:
        return int.from_bytes(self._bits, "little")

    def runs(self) -> list[tuple[int, int]]:
        return set_runs(self._bits, self._nbits)

    def count(self) -> int:
        return self.as_int().bit_count()

    def to_bytes(self) -> bytes:
        return bytes(self._bits)


def encode(bitmap_bits: bytes, nbits: int, granularity: int) -> bytes:
    header = _HEADER.pack(_MAGIC, _VERSION, granularity, nbits, zlib.crc32(bitmap_bits))
    return header + bitmap_bits


def decode(path: Path, data: bytes, granularity: int, nbits: int) -> Bitmap:
    """Check a bitmap file's header against the disk it belongs to and return its bits."""
    if len(data) < _HEADER.size:
        raise DiskCorrupt(path, "bitmap file is shorter than its header")
    magic, version, found_granularity, found_nbits, crc = _HEADER.unpack_from(data)
    bits = data[_HEADER.size :]
    if magic != _MAGIC or version != _VERSION:
        raise DiskCorrupt(path, f"not a version {_VERSION} bitmap")
    if (found_granularity, found_nbits) != (granularity, nbits):
        raise DiskCorrupt(
            path,
            f"bitmap is for {found_nbits} blocks of {found_granularity} bytes, "
            f"the disk has {nbits} blocks of {granularity}",
        )
    if len(bits) != (nbits + 7) // 8 or zlib.crc32(bits) != crc:
        raise DiskCorrupt(path, "bitmap checksum does not match")
    return Bitmap(nbits, bits)


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new content."""
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    fsync_directory(path.parent)


def save(path: Path, bitmap_bits: bytes, nbits: int, granularity: int) -> None:
    """Persist a copy of a bitmap's bits (taken in the event loop) atomically."""
    write_atomically(path, encode(bitmap_bits, nbits, granularity))


def load(path: Path, granularity: int, nbits: int) -> Bitmap:
    try:
        data = path.read_bytes()
    except FileNotFoundError as error:
        raise DiskCorrupt(path, "bitmap file is missing") from error
    return decode(path, data, granularity, nbits)
