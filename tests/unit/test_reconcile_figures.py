"""A warm VM's reconcile figures: per pass, read from the cache's heartbeat while a pass runs
(a real redis-server, a real heartbeat written as the cache writes it), from the results after
it, and the finished figures once cut over."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from appliance.components.cache.reconcile import PassResult
from appliance.components.heartbeat import HeartbeatWriter
from appliance.components.orders import ComponentId
from appliance.orchestrator import reconcile_figures as figures
from appliance.orchestrator.journal import Journal
from appliance.orchestrator.record import MigrationRecord
from appliance.orchestrator.reporting import Reporter, percent, status_of
from appliance.orchestrator.scheduler import group_lease
from appliance.orchestrator.states import Step
from appliance.sink import MemorySink
from clients.migrate import progress_text
from messages.events import Event, SourceCloneResponse
from tests.support.lab import MIB
from tests.unit.test_clone_requests import Env, clone, env, records

__all__ = ["env"]  # the fixture


def _result(pass_no: int, copied: int, remainder: int, seconds: float = 0.5) -> PassResult:
    return PassResult(
        pass_no=pass_no,
        mark=pass_no,
        chunks=copied // MIB,
        bytes=copied,
        bytes_written=copied,
        fetched_bytes=0,
        remainder_chunks=remainder // MIB,
        remainder_bytes=remainder,
        redone=False,
        seconds=seconds,
    )


def test_a_round_counts_done_passes_the_one_under_way_and_what_the_others_left() -> None:
    live_round = figures.Round(4, {"disk-0": 3 * MIB, "disk-1": 2 * MIB, "disk-2": MIB})
    live_round.done("disk-0", _result(7, 4 * MIB, MIB, seconds=2.0))
    live = figures.LivePass(bytes_done=MIB, bytes_total=5 * MIB, rate_bytes_per_s=MIB)
    shown = live_round.figures("disk-1", live)
    assert (shown.bytes_done, shown.bytes_total) == (5 * MIB, 10 * MIB)
    assert shown.rate_bytes_per_s == MIB and shown.eta_seconds == 5.0
    # Between passes: the round's own rate.
    between = live_round.figures()
    assert (between.bytes_done, between.bytes_total) == (4 * MIB, 7 * MIB)
    assert between.rate_bytes_per_s == 2 * MIB and between.eta_seconds == 1.5


def test_the_heartbeat_s_figures_count_only_for_the_pass_asked() -> None:
    entry = {"pass": 3, "bytes_done": 1, "bytes_total": 2, "rate_bytes_per_s": 5, "eta_s": 0.2}
    beat = {"reconcile_progress": {"m-1-disk-0": entry}}
    assert figures.live_pass(beat, "m-1-disk-0", 3) == figures.LivePass(1, 2, 5.0)
    assert figures.live_pass(beat, "m-1-disk-0", 4) is None  # an older pass's
    assert figures.live_pass(beat, "m-1-disk-1", 3) is None
    assert figures.live_pass({"reconcile_progress": "x"}, "m-1-disk-0", 3) is None


class WakingSink(MemorySink):
    """Wakes the test at every event it is given (no polling)."""

    def __init__(self) -> None:
        super().__init__()
        self.published = asyncio.Event()

    async def publish(self, event: Event, reply_to: str | None = None) -> None:
        await super().publish(event, reply_to)
        self.published.set()


def _at(record: MigrationRecord, step: Step, **changes: object) -> MigrationRecord:
    return replace(record, step=step, **changes)  # type: ignore[arg-type]


async def test_figures_are_read_from_the_cache_while_a_pass_runs_then_finished(env: Env) -> None:
    (answer,) = await env.clones.handle(clone(["vm-0003"]))
    (record,) = await records(env, [answer.body.migration_id])
    config = replace(env.deps.config, progress_interval_s=0.05)
    sink = WakingSink()
    reporter = Reporter("ferry-unit", sink, env.deps.clock)
    deps = replace(env.deps, config=config, reporter=reporter)
    lease = await deps.leases.acquire(group_lease(record.group_id))
    assert lease is not None
    journal = Journal(deps, lease)
    record = await journal.update(record, bytes_done=8 * MIB, bytes_total=8 * MIB)  # the bulk

    extra, live_round = figures.begin_round(record)
    record = await journal.update(record, extra=extra, **live_round.figures().changes())
    assert figures.round_of(record) == 1 and extra["reconcile"]["bulk_bytes"] == 8 * MIB
    key = record.disks[0].served_as
    under_way = {"pass": 1, "bytes_done": 3 * MIB, "bytes_total": 4 * MIB,
                 "rate_bytes_per_s": MIB, "eta_s": 1.0}  # fmt: skip
    writer = HeartbeatWriter(
        deps.store,
        ComponentId.parse(config.cache_component),
        lambda: {"reconcile_progress": {key: under_way}},
        interval_s=0.05,
        ttl_s=30,
    )
    await writer.beat()

    async def stored() -> MigrationRecord:
        (found,) = await records(env, [record.migration_id])
        return found

    async with figures.watching(deps, journal, record, live_round, ("disk-0", key), 1):
        # The pass runs (held here): its figures reach the record, and clients.
        async with asyncio.timeout(10):
            await sink.published.wait()
    during = await stored()
    assert during.bytes_total == 4 * MIB and during.rate_bytes_per_s == MIB
    assert during.eta_seconds == 1.0 and percent(during) == 75.0
    shown = status_of(_at(during, Step.RECONCILING), False)
    assert (shown.progress_percent, shown.reconcile_pass) == (75.0, 1)
    assert shown.rate_bytes_per_s == MIB and shown.eta_seconds == 1.0
    assert progress_text(shown) == "75.0% of 4 MiB (pass 1)"  # ferry migrations
    (event,) = sink.events  # published as it went
    assert isinstance(event, SourceCloneResponse) and event.body.bytes_done == 3 * MIB

    # The pass ends: its result's figures; a pass noted twice (a cutover rerun) counts once.
    result = _result(1, 4 * MIB, 0)
    live_round.done("disk-0", result)
    for _ in range(2):
        record = replace(record, extra=figures.note_pass(record, "disk-0", result))
    assert record.extra["reconcile"]["copied_bytes"] == 4 * MIB
    done = live_round.figures()
    assert (done.bytes_done, done.bytes_total, done.eta_seconds) == (4 * MIB, 4 * MIB, 0.0)
    # A round that finds nothing is done, not "0 %".
    empty = _at(record, Step.RECONCILING, bytes_done=0, bytes_total=0)
    assert status_of(empty, False).progress_percent == 100.0
    # Cut over: the bulk copy's bytes and every pass's, at 100 %.
    final = figures.finished(record)
    cut = _at(record, Step.CUT_OVER, **final.changes())
    shown = status_of(cut, False)
    assert shown.bytes_done == shown.bytes_total == 12 * MIB and shown.progress_percent == 100.0
    assert shown.volumes == (record.disks[0].volume_id,)
