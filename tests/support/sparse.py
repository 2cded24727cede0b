"""Where a sparse file holds data, from SEEK_DATA / SEEK_HOLE."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path


def data_ranges(fd: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each allocated range of an open file, in order."""
    size, pos = os.fstat(fd).st_size, 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            return
        pos = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, pos


def file_data_ranges(path: Path) -> list[tuple[int, int]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return list(data_ranges(fd))
    finally:
        os.close(fd)
