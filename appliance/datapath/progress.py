"""Transfer progress: bytes done of the total, rate over a moving window, ETA.

The engine counts; a reporter task hands a :class:`TransferProgress` snapshot
to the caller's callback every ``interval_s`` and once at the end. The
callback is how progress travels up (to the orchestrator, then the bus)
without the data path importing anything above it. It must not block: a
caller that publishes somewhere slow should hand the snapshot to a task.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from appliance.clock import Clock


class TransferPhase(enum.StrEnum):
    COPYING = "copying"
    CHECKING = "checking"
    """Whole-image check or certification: hashing both sides."""
    DONE = "done"


@dataclass(frozen=True, slots=True)
class TransferProgress:
    """``bytes_*`` count allocated bytes (data, written zeroes); skipped-by-resume are done."""

    transfer_id: str
    phase: TransferPhase
    bytes_done: int
    bytes_total: int
    chunks_done: int
    chunks_total: int
    rate_bytes_per_s: float
    eta_s: float | None
    elapsed_s: float

    @property
    def fraction(self) -> float:
        return self.bytes_done / self.bytes_total if self.bytes_total else 1.0


ProgressCallback = Callable[[TransferProgress], None]


class ProgressMeter:
    """Counts what is done; the rate is measured over the last ``window_s`` seconds.

    The rate counts only bytes that needed work (data read and sent); zeroed
    ranges finish at once and would make the ETA lie.
    """

    def __init__(
        self,
        transfer_id: str,
        clock: Clock,
        *,
        bytes_total: int,
        chunks_total: int,
        window_s: float = 10.0,
    ) -> None:
        self.transfer_id = transfer_id
        self.bytes_total = bytes_total
        self.chunks_total = chunks_total
        self.bytes_done = 0
        self.chunks_done = 0
        self.phase = TransferPhase.COPYING
        self._worked_bytes = 0
        self._clock = clock
        self._window_s = window_s
        self._started = clock.monotonic()
        self._samples: deque[tuple[float, int]] = deque([(self._started, 0)])

    def add(self, nbytes: int, chunks: int, *, worked: bool) -> None:
        self.bytes_done += nbytes
        self.chunks_done += chunks
        if worked:
            self._worked_bytes += nbytes

    def _rate(self, now: float) -> float:
        self._samples.append((now, self._worked_bytes))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self._window_s:
            self._samples.popleft()
        then, worked_then = self._samples[0]
        elapsed = now - then
        return (self._worked_bytes - worked_then) / elapsed if elapsed > 0 else 0.0

    def snapshot(self) -> TransferProgress:
        now = self._clock.monotonic()
        rate = self._rate(now)
        remaining = max(self.bytes_total - self.bytes_done, 0)
        if remaining == 0:
            eta: float | None = 0.0
        else:
            eta = remaining / rate if rate > 0 else None
        return TransferProgress(
            transfer_id=self.transfer_id,
            phase=self.phase,
            bytes_done=self.bytes_done,
            bytes_total=self.bytes_total,
            chunks_done=self.chunks_done,
            chunks_total=self.chunks_total,
            rate_bytes_per_s=rate,
            eta_s=eta,
            elapsed_s=now - self._started,
        )

    async def report_every(self, interval_s: float, callback: ProgressCallback) -> None:
        while True:
            await self._clock.sleep(interval_s)
            callback(self.snapshot())
