"""Commands about VMs running in the cloud (tbc): migrate back, sync (an epoch now), commit.

They act through the group's run, which holds the group's lease and alone gives
the components orders: a command writes what it asks on the migration
(``MigrationStore.ask``) and the run, resting, picks it up at its next tick.

* MigrateBackRequest (planned): every member of each named migration's
  dependency group goes back together. Its options (power on, keep the
  snapshot) are asked first, the migrate back itself last.
* SyncRequest on resting migrations: each asks for one more epoch and the
  answer waits until the run says the epochs cut for it are committed on-prem.
  On anything else SyncRequest keeps its older meaning: it resumes failed cold
  migrations that kept their data (``resume.Resumes``).
* CommitRequest on a warm migration cut over to its volumes (CUT_OVER): every member
  of its group asks ``commit``; the run cleans up (``warm.commit``). On a tbc VM
  resting in the cloud: the same ask turns the group into a warm migration from there
  (bulk copy, reconcile, cutover, then the commit's cleanup without another request);
  refused with its own code while migrating back, and a migrate back once a commit
  was asked is refused (``cut_over``).
* A warm VM cut over (or committed) has no way back: migrate back and sync are refused
  with ``cut_over``.
"""

from __future__ import annotations

from appliance.errors import CommandRejected, WrongStep
from appliance.orchestrator.context import Deps
from appliance.orchestrator.record import MigrationRecord, load
from appliance.orchestrator.resting import (
    ASK_BACK,
    ASK_BACK_POWER_ON,
    ASK_KEEP_SNAPSHOT,
    ASK_SYNC,
)
from appliance.orchestrator.states import (
    MIGRATING_BACK,
    RECOVERY,
    RECOVERY_ENDS,
    RESTING,
    Step,
    machine_for,
    on_components,
)
from appliance.orchestrator.warm import ASK_COMMIT
from appliance.orchestrator.warm_offline import ASK_BULK_DONE, ASK_PACKAGE_AT, BULK_DONE_HANDLED
from messages.commands import MigrateBackRequestBody
from messages.common import MigrationType
from messages.errors import ErrorCode

BACK_OR_DONE = frozenset({*MIGRATING_BACK, Step.MIGRATED_BACK, *RECOVERY, *RECOVERY_ENDS})
"""Going back or gone back: planned, or sent back by a recovery (a component lost)."""


def _refuse_back(command: str, record: MigrationRecord, asked: bool = False) -> None:
    """Migrating back (or asked to: the run takes it up at its next tick), or migrated back."""
    if record.step in BACK_OR_DONE or asked:
        step = record.step.value if record.step in BACK_OR_DONE else "asked to migrate back"
        raise WrongStep(command, record.migration_id, step, ErrorCode.MIGRATING_BACK)


CUT_OVER_OR_DONE = frozenset({Step.CUTTING_OVER, Step.CUT_OVER, Step.COMMITTING, Step.COMPLETED})


def _refuse_cut_over(command: str, record: MigrationRecord) -> None:
    """A warm VM cutting over, cut over or committed runs on its cloud volumes for good."""
    if record.migration_type is MigrationType.WARM and record.step in CUT_OVER_OR_DONE:
        raise WrongStep(
            command,
            record.migration_id,
            f"{record.step.value} (warm: the VM runs on its cloud volumes; no way back)",
            ErrorCode.CUT_OVER,
        )


def _refuse_not_resting(command: str, record: MigrationRecord) -> None:
    _refuse_cut_over(command, record)
    if record.step not in RESTING:
        kind = record.migration_type.value
        machine = machine_for(record.migration_type)
        where = record.step.value if machine.resting else f"{record.step.value} ({kind})"
        raise WrongStep(command, record.migration_id, where, ErrorCode.NOT_RESTING)


class CloudCommands:
    def __init__(self, deps: Deps) -> None:
        self._deps = deps

    async def _records(self, migration_ids: list[str]) -> list[MigrationRecord]:
        return [load(s.record) for s in await self._deps.migrations.get_many(migration_ids)]

    async def _refuse_going_back(self, command: str, records: list[MigrationRecord]) -> None:
        for record in records:
            asks = await self._deps.migrations.asks(record.migration_id)
            _refuse_back(command, record, ASK_BACK in asks)

    async def _groups(self, records: list[MigrationRecord]) -> list[MigrationRecord]:
        """Every member of the named migrations' groups."""
        members: dict[str, MigrationRecord] = {}
        for group_id in dict.fromkeys(r.group_id for r in records):
            info = await self._deps.migrations.group(group_id)
            ids = list(info.members) if info is not None else []
            for record in await self._records(ids):
                members[record.migration_id] = record
        return list(members.values())

    async def migrate_back(
        self, migration_ids: list[str], body: MigrateBackRequestBody
    ) -> list[MigrationRecord]:
        command = "MigrateBackRequest"
        named = await self._records(migration_ids)
        await self._refuse_going_back(command, named)
        # Asked to commit: cut_over, whether the VM still rests or has gone on as warm.
        await self._refuse_committed(command, named)
        for record in named:
            _refuse_not_resting(command, record)
        if not body.planned:
            raise CommandRejected(
                "an unplanned migrate back (to the last committed epoch, without the "
                "cloud VM) is not built yet; send planned: true",
                ErrorCode.NOT_IMPLEMENTED,
            )
        members = await self._groups(named)
        await self._refuse_going_back(command, members)
        await self._refuse_committed(command, members)
        for record in members:
            _refuse_not_resting(command, record)
        migrations = self._deps.migrations
        for record in members:
            await migrations.ask(record.migration_id, ASK_BACK_POWER_ON, _flag(body.power_on))
            await migrations.ask(record.migration_id, ASK_KEEP_SNAPSHOT, _flag(body.keep_snapshot))
            await migrations.ask(record.migration_id, ASK_BACK, "1")
        return members

    async def _refuse_committed(self, command: str, records: list[MigrationRecord]) -> None:
        """A tbc VM asked to commit goes on as warm: it has no way back."""
        for record in records:
            if ASK_COMMIT in await self._deps.migrations.asks(record.migration_id):
                raise WrongStep(command, record.migration_id, "asked to commit", ErrorCode.CUT_OVER)

    def resting(self, records: list[MigrationRecord]) -> bool:
        """Is this sync about VMs in the cloud (else: a resume of failed migrations)?"""
        for record in records:
            _refuse_back("SyncRequest", record)
            _refuse_cut_over("SyncRequest", record)
        return any(r.step in RESTING for r in records)

    async def sync(self, migration_ids: list[str]) -> list[MigrationRecord]:
        """One more epoch on every disk of each, answered once committed on-prem."""
        records = await self._records(migration_ids)
        await self._refuse_going_back("SyncRequest", records)
        for record in records:
            _refuse_not_resting("SyncRequest", record)
        asked = {
            r.migration_id: await self._deps.migrations.ask_count(r.migration_id, ASK_SYNC)
            for r in records
        }
        config = self._deps.config
        limit = config.epoch_commit_timeout_s + 2 * config.component_order_timeout_s
        answered: list[MigrationRecord] = []
        deadline = self._deps.clock.monotonic() + limit
        for migration_id, count in asked.items():
            found = await self._answered(migration_id, count, deadline, limit)
            if found is not None:
                answered.append(found)
        return answered

    async def _answered(
        self, migration_id: str, count: int, deadline: float, limit: float
    ) -> MigrationRecord | None:
        """The record once its run answered sync number ``count`` (None: it is gone)."""
        clock = self._deps.clock
        while True:
            stored = await self._deps.migrations.get(migration_id)
            if stored is None:
                return None
            record = load(stored.record)
            if record.syncs_done >= count:
                return record
            _refuse_back("SyncRequest", record)
            if clock.monotonic() > deadline:
                raise CommandRejected(
                    f"the epoch asked of {migration_id} was not committed within "
                    f"{limit:g} s; it will still be",
                    ErrorCode.UNAVAILABLE,
                )
            await clock.sleep(self._deps.config.resting_poll_s / 4)

    async def bulk_done(
        self, migration_ids: list[str], location: str | None
    ) -> list[MigrationRecord]:
        """The package was imported at the cloud: the run verifies it and writes the volumes.
        Answered once that import is done (its error names every bad chunk, and the
        migration waits for the next request) or, at the latest, after the order timeout."""
        command = "BulkMigrationDoneRequest"
        records = await self._records(migration_ids)
        for record in records:
            if not record.bulk_offline or record.step is not Step.AWAITING_BULK:
                where = record.step.value if record.bulk_offline else "not an offline bulk"
                raise WrongStep(command, record.migration_id, where, ErrorCode.CONFLICT)
        asked = {}
        for record in records:
            if location is not None:
                await self._deps.migrations.ask(record.migration_id, ASK_PACKAGE_AT, location)
            asked[record.migration_id] = await self._deps.migrations.ask_count(
                record.migration_id, ASK_BULK_DONE
            )
        deadline = self._deps.clock.monotonic() + self._deps.config.component_order_timeout_s
        answered = []
        for migration_id, count in asked.items():
            answered.append(await self._imported(migration_id, count, deadline))
        return answered

    async def _imported(self, migration_id: str, count: int, deadline: float) -> MigrationRecord:
        clock = self._deps.clock
        while True:
            stored = await self._deps.migrations.get(migration_id)
            assert stored is not None  # offline bulk migrations are never deleted meanwhile
            record = load(stored.record)
            handled = int(record.extra.get(BULK_DONE_HANDLED, 0))
            if handled >= count or record.step is not Step.AWAITING_BULK:
                return record
            if clock.monotonic() > deadline:
                return record
            await clock.sleep(self._deps.config.resting_poll_s / 4)

    async def commit(self, migration_ids: list[str]) -> list[MigrationRecord]:
        command = "CommitRequest"
        named = await self._records(migration_ids)
        await self._refuse_going_back(command, named)
        for record in named:
            _refuse_not_cut_over(command, record)
        members = await self._groups(named)
        for record in members:
            _refuse_not_cut_over(command, record)
            if record.step in RESTING:  # cut over (warm), or running in the cloud (tbc)
                await self._deps.migrations.ask(record.migration_id, ASK_COMMIT, "1")
        return members


def _refuse_not_cut_over(command: str, record: MigrationRecord) -> None:
    """A commit is for a warm VM cut over (again: once committing or committed, a no-op)."""
    if record.migration_type is MigrationType.WARM:
        if record.step not in {Step.CUT_OVER, Step.COMMITTING, Step.COMPLETED}:
            raise WrongStep(
                command,
                record.migration_id,
                f"{record.step.value} (warm: not cut over yet)",
                ErrorCode.NOT_RESTING,
            )
        return
    if record.step not in RESTING:
        raise WrongStep(command, record.migration_id, record.step.value, ErrorCode.NOT_RESTING)


async def any_on_components(deps: Deps) -> bool:
    """Does any unfinished migration have its disks served by the components now?"""
    migrations = deps.migrations
    for group_id in await migrations.active_groups():
        info = await migrations.group(group_id)
        for stored in await migrations.get_many(list(info.members) if info else []):
            record = load(stored.record)
            if on_components(record.migration_type, record.step):
                return True
    return False


def _flag(value: bool) -> str:
    return "1" if value else "0"
