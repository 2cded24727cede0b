"""Crash consistency, the heart of the cache (DESIGN.md §5, §9 "Prefix consistency").

The lab's workload generator writes to the cloud cache's NBD export, flushing
like a guest, through 20+ epochs, while the cache process, the I/O manager
process, both, and the link between them are killed or dropped at seeded
moments: mid-write, mid-flush, mid-shipping and at every step of an on-prem
commit. After each crash the killed parts restart, recover, and the next
epochs commit. Checked every round:

1. the I/O manager's current image equals the replay of a prefix of the
   write log ending at or after the last committed epoch's cut (bytes);
2. after a cache restart, every write acknowledged before the last
   completed FLUSH reads back from the export (the count of lost ones is
   printed and must be 0).

After a cache crash the guest "recovers" like a journaling file system: the
ranges its unflushed writes touched are written again from the log (and
flushed), so the disk equals the replay of the whole log before the next
epoch is cut. No epoch is cut meanwhile (epochs here are cut only by the
test; the cache is sized so that dirty data never cuts one early).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import pytest

from appliance.components.onprem import CommitStep
from appliance.sites.lab.workload import WorkloadSpec
from tests.support.crashlab import KIB, MIB, CrashLab, crash_lab
from tests.support.replay import find_prefix, lost_flushed_writes, replay, unflushed_ranges

SIZE = 4 * MIB
EPOCHS = 22
SEEDS = tuple(int(seed) for seed in os.environ.get("FERRY_CRASH_SEEDS", "11,23").split(","))
"""Seeds of the random scenario; FERRY_CRASH_SEEDS=1,2,3 runs others (a longer soak)."""
FAILED_ATTEMPTS = 3
"""Shipping attempts that must fail while the link is down before it comes back."""


class Fault(StrEnum):
    NONE = "none"
    CACHE_MID_IO = "cache-mid-io"
    CACHE_MID_FLUSH = "cache-mid-flush"
    CACHE_MID_COMMIT = "cache-mid-commit"
    ONPREM_AT_STEP = "onprem-at-step"
    ONPREM_MID_SHIP = "onprem-mid-ship"
    BOTH_AT_STEP = "both-at-step"
    LINK_DOWN = "link-down"
    LINK_DAMAGE = "link-damage"


@dataclass
class Tally:
    cuts: dict[int, int] = field(default_factory=dict)
    """Epoch -> the last write sequence acknowledged before its cut."""
    faults: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    cache_restarts: int = 0
    onprem_restarts: int = 0
    resent: int = 0
    """Epochs a restarted cache shipped again after on-prem had committed them."""
    untripped: int = 0
    """Mid-shipping faults whose epoch committed before the trip point was reached."""
    damaged: int = 0
    """Chunks damaged on the link, caught by the hashed writes and sent again."""


def schedule(rng: random.Random) -> list[Fault]:
    """Every fault at least once, the rest drawn at random; NONE first (a clean start).

    The link is taken down once per run: each outage costs the data path's own
    retry backoff inside the shipping attempt it breaks (several seconds).
    """
    kinds = [f for f in Fault if f is not Fault.NONE]
    drawn = [f for f in Fault if f is not Fault.LINK_DOWN]
    rounds = kinds + [rng.choice(drawn) for _ in range(EPOCHS - 1 - len(kinds))]
    rng.shuffle(rounds)
    return [Fault.NONE, *rounds]


async def recover_cache(lab: CrashLab, tally: Tally) -> None:
    """Restart the killed cache; check flushed writes survived; the guest repairs the rest."""
    in_flight = [lab.vm.in_flight] if lab.vm.in_flight is not None else []
    lab.vm.in_flight = None
    await lab.restart_cache()
    tally.cache_restarts += 1
    log = await lab.read_log()
    image = await lab.vm.read(0, SIZE)
    lost, damaged = lost_flushed_writes(image, lab.base, log, in_flight)
    tally.lost += len(lost)
    assert not lost, f"writes acknowledged before a completed flush were lost: {lost}"
    assert not damaged, f"bytes no write touched changed: {damaged}"
    wanted = replay(lab.base, log, log.last_sequence)
    for start, end in unflushed_ranges(log, in_flight):
        await lab.vm.write(start, bytes(wanted[start:end]))
    await lab.workload.flush()


async def guest_runs(lab: CrashLab, rng: random.Random, fault: Fault, tally: Tally) -> None:
    """Some guest I/O; the cache is killed in the middle of it if ``fault`` says so."""
    count, flush_every = rng.randint(4, 12), rng.choice([1, 2, 3, 4])
    if fault is Fault.CACHE_MID_IO:
        issued = lab.vm.at_operation(rng.randint(1, count))
        run = asyncio.create_task(lab.workload.run(count=count, flush_every=flush_every))
        waiter = asyncio.create_task(issued.wait())
        await asyncio.wait([run, waiter], return_when="FIRST_COMPLETED")
        waiter.cancel()
        await lab.cache.kill()
        with contextlib.suppress(Exception):
            await run  # it fails (or had just finished): the disk went away
        await recover_cache(lab, tally)
        return
    await lab.workload.run(count=count, flush_every=flush_every)
    if fault is Fault.CACHE_MID_FLUSH:
        issued = lab.vm.at_flush()
        flush = asyncio.create_task(lab.workload.flush())
        await issued.wait()
        await lab.cache.kill()
        with contextlib.suppress(Exception):
            await flush
        await recover_cache(lab, tally)


async def committed_or(lab: CrashLab, epoch: int, trip: asyncio.Event) -> bool:
    """Wait until ``epoch`` commits or ``trip`` is set; whether the trip came first."""
    commit = asyncio.create_task(lab.cache.call({"op": "wait_committed", "epoch": epoch}))
    tripped = asyncio.create_task(trip.wait())
    await asyncio.wait([commit, tripped], return_when="FIRST_COMPLETED")
    tripped.cancel()
    if not commit.done():
        commit.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await commit
        return True
    await commit
    return False


async def ship_with_fault(lab: CrashLab, rng: random.Random, fault: Fault, tally: Tally) -> int:
    """Cut the next epoch with ``fault`` striking its shipping or commit; its number."""
    status = await lab.cache.call({"op": "status"})
    epoch = int(status["open"])
    at_step = fault in (Fault.ONPREM_AT_STEP, Fault.BOTH_AT_STEP, Fault.CACHE_MID_COMMIT)
    if at_step:
        step = rng.choice(list(CommitStep))
        await lab.onprem.call({"op": "arm", "epoch": epoch, "step": step.value})
    trip = lab.proxy.trip_after(rng.randint(1, 96 * KIB))
    if fault is Fault.LINK_DAMAGE:
        lab.proxy.corrupt_once_after(rng.randint(64, 48 * KIB))
    tally.cuts[epoch] = lab.workload.stats().last_sequence
    assert await lab.cache.call({"op": "cut"}) == epoch
    if at_step:
        await lab.onprem.paused()
        if fault is not Fault.ONPREM_AT_STEP:
            await lab.cache.kill()
        if fault is Fault.CACHE_MID_COMMIT:
            await lab.onprem.call({"op": "release"})  # the commit goes on without its caller
        else:
            await lab.onprem.kill()
            await lab.restart_onprem()
            tally.onprem_restarts += 1
        if fault is not Fault.ONPREM_AT_STEP:
            await recover_cache(lab, tally)
    elif fault in (Fault.ONPREM_MID_SHIP, Fault.LINK_DOWN):
        await strike_mid_ship(lab, epoch, fault, trip, int(status["failures"]), tally)
    await lab.cache.call({"op": "wait_committed", "epoch": epoch})
    lab.proxy.disarm()
    if fault is Fault.LINK_DAMAGE:
        tally.damaged += int((await lab.cache.call({"op": "status"}))["mismatches"]) - int(
            status["mismatches"]
        )
    if fault in (Fault.BOTH_AT_STEP, Fault.CACHE_MID_COMMIT):
        tally.resent += int((await lab.cache.call({"op": "status"}))["resent"])
    return epoch


async def strike_mid_ship(
    lab: CrashLab, epoch: int, fault: Fault, trip: asyncio.Event, failures: int, tally: Tally
) -> None:
    """Once ``trip`` bytes of the epoch crossed the link: kill on-prem, or take the link down."""
    if not await committed_or(lab, epoch, trip):
        tally.untripped += 1  # the epoch was smaller than the trip point: it committed first
    elif fault is Fault.ONPREM_MID_SHIP:
        await lab.onprem.kill()
        await lab.restart_onprem()
        tally.onprem_restarts += 1
    else:
        lab.proxy.drop_every(0)
        lab.proxy.drop_now()
        await lab.cache.call({"op": "wait_failures", "failures": failures + FAILED_ATTEMPTS})
        lab.proxy.drop_every(None)


async def check_onprem(lab: CrashLab, epoch: int, tally: Tally) -> None:
    """Check 1: on-prem is the replay of a log prefix at or after the epoch's cut."""
    log = await lab.read_log()
    image = await lab.onprem_image()
    cut = tally.cuts[epoch]
    prefix = find_prefix(image, lab.base, log, cut)
    assert prefix is not None, f"on-prem after epoch {epoch} is no prefix from write {cut} on"


@pytest.mark.parametrize("seed", SEEDS)
async def test_prefix_consistency_through_crashes_of_cache_onprem_and_link(
    tmp_path: Path, seed: int
) -> None:
    rng = random.Random(f"crash-consistency:{seed}")
    spec = WorkloadSpec(seed=seed, read_ratio=0.2, max_length=160 * KIB, hot_fraction=0.1)
    tally = Tally()
    started = time.monotonic()
    async with crash_lab(tmp_path, seed, SIZE, spec) as lab:
        for fault in schedule(rng):
            tally.faults[fault.value] = tally.faults.get(fault.value, 0) + 1
            before = lab.workload.stats().last_sequence
            await guest_runs(lab, rng, fault, tally)
            while lab.workload.stats().last_sequence == before:  # no empty epochs
                await lab.workload.run(count=1)
            epoch = await ship_with_fault(lab, rng, fault, tally)
            await check_onprem(lab, epoch, tally)
        status = await lab.cache.call({"op": "status"})
        log = await lab.read_log()
    print(
        f"seed {seed}: {len(tally.cuts)} epochs, {log.last_sequence} writes, "
        f"{len(log.flushes)} flushes, cache restarts {tally.cache_restarts}, "
        f"on-prem restarts {tally.onprem_restarts}, faults {tally.faults}, "
        f"bytes damaged on the link {lab.proxy.corrupted} times, "
        f"chunks caught and re-sent {tally.damaged}, "
        f"epochs found committed when staged again (commit replayed) {tally.resent}, "
        f"mid-shipping faults that found the epoch committed first {tally.untripped}, "
        f"lost acknowledged-and-flushed writes: {tally.lost}, "
        f"{time.monotonic() - started:.1f} s"
    )
    assert tally.lost == 0
    assert len(tally.cuts) >= 20
    assert status["committed"] == max(tally.cuts)


@pytest.mark.parametrize("step", [CommitStep.VERIFIED, CommitStep.STAGING_DURABLE])
async def test_onprem_killed_before_the_commit_record_gets_the_whole_epoch_again(
    tmp_path: Path, step: CommitStep
) -> None:
    """The restarted I/O manager discarded the landed epoch: the cache sends all of it again
    (it used to skip what its checkpoint said had landed, and retried a rejected commit
    forever)."""
    spec = WorkloadSpec(seed=5, read_ratio=0.0, max_length=160 * KIB)
    async with crash_lab(tmp_path, 5, SIZE, spec) as lab:
        await lab.workload.run(count=10, flush_every=3)
        await lab.onprem.call({"op": "arm", "epoch": 1, "step": step.value})
        assert await lab.cache.call({"op": "cut"}) == 1
        await lab.onprem.paused()
        await lab.onprem.kill()
        await lab.restart_onprem()
        await lab.cache.call({"op": "wait_committed", "epoch": 1})
        log = await lab.read_log()
        assert await lab.onprem_image() == replay(lab.base, log, log.last_sequence)


async def test_cache_killed_after_the_commit_record_ships_again_and_the_commit_replays(
    tmp_path: Path,
) -> None:
    """On-prem committed epoch 1 but the cache died before hearing it: the restarted cache
    ships epoch 1 again, the I/O manager's replay is a no-op, and epoch 2 follows."""
    spec = WorkloadSpec(seed=6, read_ratio=0.0, max_length=160 * KIB)
    tally = Tally()
    async with crash_lab(tmp_path, 6, SIZE, spec) as lab:
        await lab.workload.run(count=10, flush_every=4)
        tally.cuts[1] = lab.workload.stats().last_sequence
        await lab.onprem.call({"op": "arm", "epoch": 1, "step": CommitStep.COMMIT_RECORDED})
        assert await lab.cache.call({"op": "cut"}) == 1
        await lab.onprem.paused()
        await lab.cache.kill()
        await lab.onprem.call({"op": "release"})
        await recover_cache(lab, tally)
        await lab.cache.call({"op": "wait_committed", "epoch": 1})
        assert (await lab.cache.call({"op": "status"}))["resent"] == 1
        await check_onprem(lab, 1, tally)
        assert await lab.onprem_image() == replay(lab.base, await lab.read_log(), tally.cuts[1])
        await lab.workload.run(count=6)
        tally.cuts[2] = lab.workload.stats().last_sequence
        assert await lab.cache.call({"op": "cut"}) == 2
        await lab.cache.call({"op": "wait_committed", "epoch": 2})
        await check_onprem(lab, 2, tally)


async def test_chunk_damaged_on_the_link_to_the_io_manager_is_detected_and_resent(
    tmp_path: Path,
) -> None:
    spec = WorkloadSpec(seed=8, read_ratio=0.0, min_length=256 * KIB, max_length=MIB)
    async with crash_lab(tmp_path, 8, SIZE, spec) as lab:
        await lab.workload.run(count=3, flush_every=3)
        lab.proxy.corrupt_once_after(100_000)  # inside the second chunk's payload
        assert await lab.cache.call({"op": "cut"}) == 1
        await lab.cache.call({"op": "wait_committed", "epoch": 1})
        status = await lab.cache.call({"op": "status"})
        assert lab.proxy.corrupted == 1
        assert status["mismatches"] >= 1
        log = await lab.read_log()
        assert await lab.onprem_image() == replay(lab.base, log, log.last_sequence)


async def test_link_down_mid_epoch_through_many_retries_then_back_resumes_and_commits(
    tmp_path: Path,
) -> None:
    spec = WorkloadSpec(seed=9, read_ratio=0.0, min_length=256 * KIB, max_length=MIB)
    async with crash_lab(tmp_path, 9, SIZE, spec) as lab:
        await lab.workload.run(count=4, flush_every=2)
        tripped = lab.proxy.trip_after(300 * KIB)  # part way through the epoch's bytes
        assert await lab.cache.call({"op": "cut"}) == 1
        await tripped.wait()
        lab.proxy.drop_every(0)  # down, and every reconnection dies at once
        lab.proxy.drop_now()
        await lab.cache.call({"op": "wait_failures", "failures": 5})
        log = await lab.read_log()
        assert await lab.onprem_image() == lab.base  # nothing committed while down
        lab.proxy.drop_every(None)  # back
        await lab.cache.call({"op": "wait_committed", "epoch": 1})
        assert await lab.onprem_image() == replay(lab.base, log, log.last_sequence)
        assert (await lab.cache.call({"op": "status"}))["failures"] >= 5
