"""Extents: immutable runs of bytes with their allocation state."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Extent:
    """``length`` bytes from ``start``; ``zero`` reads as zeroes, ``hole`` is unallocated.

    A hole always reads as zeroes (``hole`` implies ``zero``); an allocated
    extent may still be known to be zero (written zeroes).
    """

    start: int
    length: int
    zero: bool = False
    hole: bool = False

    def __post_init__(self) -> None:
        if self.start < 0 or self.length < 0:
            raise ValueError(f"negative extent start={self.start} length={self.length}")
        if self.hole and not self.zero:
            raise ValueError("a hole must read as zero")

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def data(self) -> bool:
        """True when this extent holds bytes that must be read and sent."""
        return not self.zero
