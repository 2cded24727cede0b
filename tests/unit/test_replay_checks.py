"""The crash suite's reference checks catch what they must: a lost flushed write, a changed
byte nothing wrote, an image that is no prefix of the log; and let unflushed writes go."""

from __future__ import annotations

import random

from appliance.sites.lab.workload import (
    FlushRecord,
    WorkloadLog,
    WriteRecord,
    content_hash,
    write_content,
)
from tests.support.replay import find_prefix, lost_flushed_writes, replay

SEED = 3
SIZE = 64 * 1024


def _log(spans: list[tuple[int, int]], flushed: int) -> WorkloadLog:
    writes = tuple(
        WriteRecord(seq, offset, length, content_hash(write_content(SEED, seq, length)), 0.0)
        for seq, (offset, length) in enumerate(spans, start=1)
    )
    return WorkloadLog(SEED, SIZE, writes, (FlushRecord(flushed, 0.0),))


BASE = random.Random(1).randbytes(SIZE)
# 1 and 2 overlap; 3 is flushed; 4 overwrites part of 1 after the flush; 48K.. never written.
LOG = _log([(0, 8192), (4096, 8192), (20000, 3000), (1000, 500)], flushed=3)


def test_an_image_holding_every_flushed_write_passes_whatever_unflushed_writes_did() -> None:
    full = replay(BASE, LOG, 4)
    assert lost_flushed_writes(bytes(full), BASE, LOG, []) == ([], [])
    half = bytearray(full)
    half[1000:1250] = replay(BASE, LOG, 3)[1000:1250]  # write 4 half landed
    assert lost_flushed_writes(bytes(half), BASE, LOG, []) == ([], [])
    in_flight = bytearray(full)
    in_flight[40000:40100] = b"\x01" * 100  # a write in flight at the crash landed
    assert lost_flushed_writes(bytes(in_flight), BASE, LOG, [(40000, 40100)]) == ([], [])


def test_a_lost_flushed_write_and_a_changed_untouched_byte_are_reported() -> None:
    image = replay(BASE, LOG, 4)
    image[21000:21010] = BASE[21000:21010]  # write 3 (flushed) partly lost
    image[12000] ^= 0xFF  # write 2's bytes
    image[50000] ^= 0xFF  # nothing ever wrote here
    lost, damaged = lost_flushed_writes(bytes(image), BASE, LOG, [])
    assert lost == [2, 3]
    assert damaged == [(23000, SIZE)]


def test_find_prefix_finds_the_cut_and_refuses_a_mix() -> None:
    for upto in range(5):
        assert find_prefix(bytes(replay(BASE, LOG, upto)), BASE, LOG, 0) == upto
    assert find_prefix(bytes(replay(BASE, LOG, 1)), BASE, LOG, 2) is None  # before the cut
    mixed = replay(BASE, LOG, 3)
    mixed[0:100] = BASE[0:100]  # write 1 undone but 2 and 3 kept: no prefix
    assert find_prefix(bytes(mixed), BASE, LOG, 0) is None
