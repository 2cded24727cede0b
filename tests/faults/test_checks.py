"""The fault suite's checks can fail: a lost flushed write and a non-prefix image are caught."""

from __future__ import annotations

from appliance.sites.lab.workload import FlushRecord, WorkloadLog, WriteRecord, write_content
from tests.faults.checks import check_image
from tests.support.replay import replay

SIZE = 64 * 1024
SEED = 3


def _log() -> WorkloadLog:
    writes = tuple(
        WriteRecord(sequence, offset, 4096, "", float(sequence))
        for sequence, offset in ((1, 0), (2, 8192), (3, 16384), (4, 0))
    )
    return WorkloadLog(SEED, SIZE, writes, (FlushRecord(2, 2.5), FlushRecord(4, 4.5)))


async def test_an_image_that_is_a_prefix_at_or_after_the_bound_passes() -> None:
    base, log = bytes(SIZE), _log()
    image = bytes(replay(base, log, 3))
    check = await check_image(image, base, log, 2, planned=False)
    assert (check.prefix, check.prefix_ok, check.lost_flushed) == (3, True, 0)
    assert check.loss_window_s == 1.0  # writes 3 (t=3) to 4 (t=4) missing


async def test_a_prefix_before_the_committed_bound_fails() -> None:
    base, log = bytes(SIZE), _log()
    image = bytes(replay(base, log, 1))
    check = await check_image(image, base, log, 3, planned=False)
    assert not check.prefix_ok
    assert check.lost_flushed == 2  # writes 2 and 3: committed, missing (1: rewritten by 4)


async def test_a_flushed_write_missing_from_a_migrated_back_image_is_counted() -> None:
    base, log = bytes(SIZE), _log()
    image = bytearray(replay(base, log, 4))
    image[8192 : 8192 + 4096] = bytes(4096)  # write 2 lost; no later write covers it
    check = await check_image(bytes(image), base, log, 4, planned=True)
    assert check.prefix is None and not check.prefix_ok
    assert check.lost_flushed == 1
    assert write_content(SEED, 2, 4096) != bytes(4096)
