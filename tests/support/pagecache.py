"""A settled page cache for benchmarks: nothing dirty, memory free, chosen files warm.

Without it the kernel writes back what the previous run wrote, and reclaims
page cache for every page the next run allocates, on the same two cores while
it runs: the same tool then varies by 2x from one round to the next.
Dropping the caches needs root; otherwise only the write-back is settled.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.support.sparse import data_ranges

DROP_CACHES = Path("/proc/sys/vm/drop_caches")
READ_PIECE = 8 << 20


def settle(*warm: Path) -> None:
    """Write back everything, drop clean caches (as root), then read ``warm`` files' data."""
    os.sync()
    if os.geteuid() == 0:
        DROP_CACHES.write_text("1\n")
    for path in warm:
        fd = os.open(path, os.O_RDONLY)
        try:
            for start, end in data_ranges(fd):
                os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_WILLNEED)
                for offset in range(start, end, READ_PIECE):
                    os.pread(fd, min(READ_PIECE, end - offset), offset)
        finally:
            os.close(fd)
