"""How big a disk's cache is, and when dirty data cuts an early epoch or makes writers wait.

The rule (DESIGN.md §5): the working set from I/O profiling when known, else
15% of the disk (25% for the ``lite`` profile), never below 3 GiB (5 GiB for
``lite`` and ``performance``). ``scale`` shrinks every figure of the rule
alike (tests use 1/1024 or less).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

GiB = 1 << 30
DEFAULT_CHUNK_SIZE = 64 * 1024
"""Cache chunk: small enough that a 4 KiB write to an absent chunk costs one 64 KiB fetch."""
DEFAULT_RPO_DIRTY_BYTES = 10 * 10**9


class Profile(enum.StrEnum):
    STANDARD = "standard"
    LITE = "lite"
    PERFORMANCE = "performance"


_FRACTION = {Profile.STANDARD: 0.15, Profile.LITE: 0.25, Profile.PERFORMANCE: 0.15}
_MINIMUM = {Profile.STANDARD: 3 * GiB, Profile.LITE: 5 * GiB, Profile.PERFORMANCE: 5 * GiB}


def cache_bytes(
    disk_size: int,
    *,
    working_set: int | None = None,
    profile: Profile = Profile.STANDARD,
    scale: float = 1.0,
) -> int:
    """The cache size of one disk by the sizing rule (not yet rounded to chunks)."""
    if disk_size < 0 or scale <= 0 or (working_set is not None and working_set < 0):
        raise ValueError("disk_size and working_set must be >= 0 and scale > 0")
    wanted = working_set if working_set is not None else int(disk_size * _FRACTION[profile])
    return max(wanted, int(_MINIMUM[profile] * scale))


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """Settings of the cache component (its process passes them in)."""

    chunk_size: int = DEFAULT_CHUNK_SIZE
    profile: Profile = Profile.STANDARD
    scale: float = 1.0
    """Shrinks the sizing rule's figures alike (tests)."""
    rpo_dirty_bytes: int = DEFAULT_RPO_DIRTY_BYTES
    """An epoch is cut early once this much data is dirty (HDM: 10 GB)."""
    early_cut_fraction: float = 0.5
    """... or once dirty data fills this fraction of the cache."""
    dirty_limit_fraction: float = 0.9
    """Writers wait (never fail) while dirty data fills this fraction of the cache."""
    epoch_interval_s: float | None = 1200.0
    """An epoch is cut this often when the open one has dirty data (None: only on order
    or at the dirty thresholds); ``CloudCache.set_epoch_interval`` changes it live."""
    ship_workers: int = 4
    bandwidth_bytes_per_s: float | None = None
    retry_delay_s: float = 1.0
    """Pause between attempts to reach on-prem (a miss, a ship) after a link failure."""
    upstream_timeout_s: float = 300.0
    """A miss that cannot reach on-prem for this long fails the read (EIO)."""

    def __post_init__(self) -> None:
        if self.chunk_size < 4096 or self.chunk_size & (self.chunk_size - 1):
            raise ValueError("chunk_size must be a power of two of at least 4 KiB")
        if not 0 < self.early_cut_fraction <= self.dirty_limit_fraction <= 1:
            raise ValueError("need 0 < early_cut_fraction <= dirty_limit_fraction <= 1")

    def slots(self, disk_size: int, working_set: int | None = None) -> int:
        """Slots of the cache of one disk (at least 4, so a write always finds room)."""
        size = cache_bytes(
            disk_size, working_set=working_set, profile=self.profile, scale=self.scale
        )
        return max(4, -(-size // self.chunk_size))

    def early_cut_slots(self, slots: int) -> int:
        by_rpo = max(1, self.rpo_dirty_bytes // self.chunk_size)
        return max(1, min(int(slots * self.early_cut_fraction), by_rpo))

    def dirty_limit_slots(self, slots: int) -> int:
        return max(1, min(int(slots * self.dirty_limit_fraction), slots - 1))
