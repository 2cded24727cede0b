"""What every fault case ends with: the prefix check of DESIGN.md §9 and the lost writes.

* **Prefix check**: the on-prem image equals the replay of a prefix of the guest's
  write log (``p``), and that prefix ends at or after ``bound``, the last write
  known to be in a committed epoch (every write acknowledged before the cut of a
  SyncRequest that was answered: the sync answers once its epoch is committed).
* **Lost acknowledged-and-flushed writes**: writes up to ``promised`` (the last
  completed FLUSH for a VM migrated back as planned, which loses nothing; the
  committed bound for a VM recovered to its last epoch) whose bytes the image
  lacks where no later write could have changed them. Must be 0.
* **Loss window**: how much of the guest's writing the image lacks, in the
  guest's time: from write ``p`` to the last logged write, or to ``at`` (the moment
  the image was read while the guest went on writing).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from appliance.sites.lab.workload import WorkloadLog, visible_pieces
from tests.support.replay import find_prefix, last_flush, replay

Range = tuple[int, int]


@dataclass(frozen=True, slots=True)
class ImageCheck:
    prefix: int | None
    bound: int
    promised: int
    last: int
    lost_flushed: int
    loss_window_s: float | None

    @property
    def prefix_ok(self) -> bool:
        return self.prefix is not None and self.prefix >= self.bound

    def describe(self) -> str:
        if self.prefix is None:
            return f"FAIL: no prefix at or after write {self.bound} of {self.last}"
        verdict = "ok" if self.prefix_ok else "FAIL"
        return f"{verdict}: prefix {self.prefix}/{self.last} >= committed {self.bound}"


def _outside(start: int, end: int, cuts: list[Range]) -> list[Range]:
    pieces = [(start, end)]
    for cut_start, cut_end in cuts:
        kept: list[Range] = []
        for a, b in pieces:
            if cut_end <= a or b <= cut_start:
                kept.append((a, b))
                continue
            if a < cut_start:
                kept.append((a, cut_start))
            if cut_end < b:
                kept.append((cut_end, b))
        pieces = kept
    return pieces


def lost_writes(image: bytes, base: bytes, log: WorkloadLog, upto: int) -> list[int]:
    """Writes up to ``upto`` whose bytes ``image`` lacks (where no later write reached)."""
    expected = replay(base, log, upto)
    later = [(w.offset, w.offset + w.length) for w in log.writes if w.sequence > upto]
    lost: set[int] = set()
    for start, end, write in visible_pieces([w for w in log.writes if w.sequence <= upto]):
        for a, b in _outside(start, end, later):
            if image[a:b] != expected[a:b]:
                lost.add(write.sequence)
    return sorted(lost)


def _window(log: WorkloadLog, prefix: int | None, at: float | None) -> float | None:
    if prefix is None or not log.writes:
        return None
    times = {w.sequence: w.time for w in log.writes}
    since = times.get(prefix, log.writes[0].time)
    if at is not None:
        return max(0.0, at - since)
    if prefix >= log.last_sequence:
        return 0.0
    return max(0.0, log.writes[-1].time - since)


def _check(
    image: bytes, base: bytes, log: WorkloadLog, bound: int, planned: bool, at: float | None
) -> ImageCheck:
    promised = last_flush(log) if planned else min(bound, last_flush(log))
    prefix = find_prefix(image, base, log, min(bound, log.last_sequence))
    lost = lost_writes(image, base, log, promised)
    window = _window(log, prefix, at)
    return ImageCheck(prefix, bound, promised, log.last_sequence, len(lost), window)


async def check_image(
    image: bytes,
    base: bytes,
    log: WorkloadLog,
    bound: int,
    *,
    planned: bool,
    at: float | None = None,
) -> ImageCheck:
    """``at``: when the image was read, if the guest wrote on afterwards (its loss window
    runs to then, not to the end of the log)."""
    return await asyncio.to_thread(_check, image, base, log, bound, planned, at)
