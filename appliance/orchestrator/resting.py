"""A group resting in the cloud (tbc): epochs on time and on request, until it migrates back.

The group's run keeps its lease while its VMs run in the cloud (the scheduler
counts no slot for them). Every ``resting_poll_s`` it:

* reads what was asked of each member (``MigrationStore.asks``): a migrate back
  (then the run leaves the rest and takes the group back), a sync (a counter);
* reads each member's RTO/RPO interval from its clusters' policy (the default
  when none is set), so a policy change takes effect at the next tick: the next
  due time is the last cut plus the interval in force;
* cuts an epoch on every disk of a member whose due time has passed, that a
  sync asked for, or whose dirty bytes in the cache (its heartbeat) reached its
  policy's ``rpo_dirty_bytes`` once the previous cut is committed; the next due
  time is persisted with the cut, so the timer survives a restart of the
  appliance (a due time that passed while it was down cuts at once);
* notes the epochs the I/O manager committed (its heartbeat), and answers a
  sync (``syncs_done``) once the epochs cut for it are committed.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

from appliance.components.heartbeat import ComponentHealth
from appliance.logs import get_logger
from appliance.orchestrator.context import Deps
from appliance.orchestrator.figures import CacheFigureReader
from appliance.orchestrator.journal import Journal
from appliance.orchestrator.record import MigrationRecord
from appliance.orchestrator.serve_steps import cut_all
from appliance.orchestrator.serving import ServedDisks
from appliance.orchestrator.warm import ASK_COMMIT, may_go_warm

log = get_logger(__name__)
ASK_BACK = "back"
ASK_SYNC = "sync"
ASK_BACK_POWER_ON = "back_power_on"
ASK_KEEP_SNAPSHOT = "keep_snapshot"


class Resting:
    def __init__(self, deps: Deps, journal: Journal, records: dict[str, MigrationRecord]) -> None:
        self._deps = deps
        self._journal = journal
        self._records = records  # the run's own: updated in place
        self._disks = ServedDisks(deps, journal.lease)
        self._figures = CacheFigureReader(
            ComponentHealth(deps.store, deps.config.component_timeout_s), deps.clock
        )

    async def until_back(self) -> None:
        """Rest until a migrate back is asked for (the members carry its options then), or
        a commit, once the cache node has room for the members' bulk copy."""
        while True:
            back = commit = True
            for migration_id in list(self._records):
                asks = await self._deps.migrations.asks(migration_id)
                await self._tend(migration_id, asks)
                back = back and ASK_BACK in asks
                commit = commit and ASK_COMMIT in asks
            if back:
                await self._take_options()
                return
            if commit and await may_go_warm(self._deps, self._records):
                return  # committed: the group goes on as warm (group.py, warm.py)
            await self._deps.clock.sleep(self._deps.config.resting_poll_s)

    async def _take_options(self) -> None:
        for migration_id, record in list(self._records.items()):
            asks = await self._deps.migrations.asks(migration_id)
            self._records[migration_id] = await self._journal.update(
                record,
                back_power_on=asks.get(ASK_BACK_POWER_ON) == "1",
                keep_snapshot=asks.get(ASK_KEEP_SNAPSHOT) == "1",
            )

    async def _interval(self, record: MigrationRecord) -> float:
        policy = await self._deps.policies.for_clusters(
            record.source_cluster, record.target_cluster
        )
        seconds = policy.rto_rpo_interval_s
        return float(seconds) if seconds else self._deps.config.default_epoch_interval_s

    async def _tend(self, migration_id: str, asks: dict[str, str]) -> None:
        record = self._records[migration_id]
        now = self._deps.clock.now()
        interval = await self._interval(record)
        if record.next_epoch_due is None or record.epoch_interval_s != interval:
            start = _parse(record.last_cut_at) or now
            due = start + timedelta(seconds=interval)
            record = await self._journal.update(
                record, epoch_interval_s=interval, next_epoch_due=due.isoformat()
            )
            log.info("epoch interval", migration_id=migration_id, interval_s=interval)
        syncs = int(asks.get(ASK_SYNC, "0"))
        due_at = _parse(record.next_epoch_due) or now
        if now >= due_at or syncs > record.syncs_done or await self._too_dirty(record):
            record = await self._cut(record, interval)
            if syncs > record.syncs_done:
                record = await self._committed_all(record, syncs)
        self._records[migration_id] = await self._note_commits(record)

    async def _too_dirty(self, record: MigrationRecord) -> bool:
        """The policy's dirty-bytes threshold reached, with no cut of ours still shipping
        (the bytes of an epoch in flight count as dirty until it commits)."""
        if any(d.epoch_committed < d.epoch_cut for d in record.disks):
            return False
        if not await self._figures.dirty_over_threshold(record, self._deps.policies):
            return False
        log.info("dirty bytes reached the policy's threshold", migration_id=record.migration_id)
        return True

    async def _cut(self, record: MigrationRecord, interval: float) -> MigrationRecord:
        record, cuts = await cut_all(self._disks, self._journal, record)
        due = self._deps.clock.now() + timedelta(seconds=interval)
        log.info(
            "epoch cut",
            migration_id=record.migration_id,
            epochs={d.disk_id: epoch for d, epoch in cuts},
        )
        return await self._journal.update(record, next_epoch_due=due.isoformat())

    async def _committed_all(self, record: MigrationRecord, syncs: int) -> MigrationRecord:
        """A sync: wait until the epochs just cut are committed on-prem, then answer it."""
        wanted = [(d, d.epoch_cut) for d in record.disks]
        await self._disks.wait_committed(wanted, self._deps.config.epoch_commit_timeout_s)
        record = await self._note_commits(record)
        return await self._journal.update(record, syncs_done=syncs)

    async def _note_commits(self, record: MigrationRecord) -> MigrationRecord:
        committed = await self._disks.committed(list(record.disks))
        if all(committed.get(d.disk_id, 0) <= d.epoch_committed for d in record.disks):
            return record
        disks = tuple(
            replace(d, epoch_committed=max(d.epoch_committed, committed.get(d.disk_id, 0)))
            for d in record.disks
        )
        return await self._journal.update(
            record, disks=disks, last_commit_at=self._deps.clock.now().isoformat()
        )


def _parse(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None
