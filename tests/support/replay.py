"""The reference for crash checks: the disk as the workload's write log says it must be.

``replay(base, log, upto)`` is the base image with every logged write up to
sequence ``upto`` applied in order. ``find_prefix`` finds the prefix of the
log whose replay equals an image; ``lost_flushed_writes`` lists the writes
acknowledged before the last completed FLUSH that an image no longer holds.
"""

from __future__ import annotations

from appliance.sites.lab.workload import WorkloadLog, WriteRecord, visible_pieces, write_content

Range = tuple[int, int]
"""[start, end) in bytes."""


def _content(log: WorkloadLog, write: WriteRecord) -> bytes:
    return write_content(log.seed, write.sequence, write.length)


def replay(base: bytes, log: WorkloadLog, upto: int) -> bytearray:
    image = bytearray(base)
    for write in log.writes:
        if write.sequence > upto:
            break
        image[write.offset : write.offset + write.length] = _content(log, write)
    return image


def find_prefix(image: bytes, base: bytes, log: WorkloadLog, lowest: int) -> int | None:
    """The first sequence ``p >= lowest`` with ``replay(base, log, p) == image``, or None."""
    state = replay(base, log, lowest)
    if state == image:
        return lowest
    for write in log.writes:
        if write.sequence <= lowest:
            continue
        state[write.offset : write.offset + write.length] = _content(log, write)
        if state == image:
            return write.sequence
    return None


def last_flush(log: WorkloadLog) -> int:
    """The sequence the last completed FLUSH covered (0: none)."""
    return max((flush.upto_sequence for flush in log.flushes), default=0)


def _without(start: int, end: int, excluded: list[Range]) -> list[Range]:
    pieces = [(start, end)]
    for cut_start, cut_end in excluded:
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


def unflushed_ranges(log: WorkloadLog, in_flight: list[Range]) -> list[Range]:
    """What writes after the last flush (logged, or in flight at a crash) may have changed."""
    flushed = last_flush(log)
    ranges = [(w.offset, w.offset + w.length) for w in log.writes if w.sequence > flushed]
    return ranges + in_flight


def lost_flushed_writes(
    image: bytes, base: bytes, log: WorkloadLog, in_flight: list[Range]
) -> tuple[list[int], list[Range]]:
    """Flushed writes whose bytes ``image`` lacks, and damaged never-written ranges.

    Bytes a later write (logged, or in flight at the crash) may have changed
    are not judged: the cache owes nothing for them.
    """
    flushed = last_flush(log)
    expected = replay(base, log, flushed)
    excluded = unflushed_ranges(log, in_flight)
    lost: set[int] = set()
    writes = [w for w in log.writes if w.sequence <= flushed]
    covered: list[Range] = []
    for start, end, write in visible_pieces(writes):
        covered.append((start, end))
        for a, b in _without(start, end, excluded):
            if image[a:b] != expected[a:b]:
                lost.add(write.sequence)
    damaged: list[Range] = []
    position = 0
    for start, end in [*sorted(covered), (len(base), len(base))]:
        for a, b in _without(position, start, excluded):
            if image[a:b] != expected[a:b]:
                damaged.append((a, b))
        position = max(position, end)
    return sorted(lost), damaged
