"""The migration state machines, one table per migration type, as data.

cold::

    QUEUED ─▶ PREPARING ─▶ POWERING_OFF ─▶ SNAPSHOTTING ─▶ TRANSFERRING ─▶ VERIFYING
                                                                              │
      COMPLETED ◀─ FINALIZING ◀─ POWERING_ON ◀─ CREATING_TARGET ◀────────────┘
    any step before FINALIZING ─▶ ROLLING_BACK ─▶ FAILED | CANCELLED
    QUEUED ─▶ CANCELLED
    FAILED ─▶ QUEUED        a resume (SyncRequest), only when the failure kept the data

tbc (try before commit)::

    QUEUED ─▶ PREPARING ─▶ POWERING_OFF ─▶ SNAPSHOTTING ─▶ OPENING_DISKS
                                                              │
      RUNNING_IN_CLOUD ◀─ POWERING_ON ◀─ PARKING ◀─ CREATING_TARGET
      (resting: holds no migration slot; epochs every RTO/RPO interval)
    RUNNING_IN_CLOUD ─▶ BACK_POWERING_OFF ─▶ BACK_FINAL_EPOCH ─▶ BACK_REMOVING_CLOUD
      ─▶ BACK_RESTORING_DISKS ─▶ BACK_RETURNING ─▶ MIGRATED_BACK         (migrate back)
    any step before RUNNING_IN_CLOUD ─▶ ROLLING_BACK ─▶ FAILED | CANCELLED

recovery (tbc and warm, a component they depend on lost; orchestrator/recovery.py)::

    any step of ``recover_from`` ─▶ RECOVERY_FENCING ─▶ RECOVERY_REMOVING_CLOUD
      ─▶ RECOVERY_CHECKING_DISKS ─▶ RECOVERY_RETURNING ─▶ RECOVERED | RECOVERY_FAILED

warm: tbc's first steps, then (the VM running over the cache) BULK_COPYING ─▶ AWAITING_BULK
    (offline: the package's import at the cloud; online: passes through) ─▶ RECONCILING
    ─▶ CUTTING_OVER ─▶ CUT_OVER (resting on its volumes, awaiting a CommitRequest)
    ─▶ COMMITTING ─▶ COMPLETED. From BULK_COPYING on the guest's writes live only in the
    cloud: no rollback (orchestrator/warm.py). A tbc VM committed while RUNNING_IN_CLOUD
    enters this table at BULK_COPYING (``entries``) and goes on as warm.

Every table is a :class:`Machine`: the happy path, the steps members of a
dependency group take side by side (``solo``) and the ones they take
together, member by member (``together``), the resting step, the way back,
and where a rollback is no longer possible. Pure functions only; the runner
persists every transition (compare-and-set on the expected step) before
acting on it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from enum import StrEnum

from appliance.errors import IncorrectState
from messages.common import MigrationState, MigrationType, Phase


class Step(StrEnum):
    QUEUED = "queued"
    PREPARING = "preparing"
    POWERING_OFF = "powering_off"
    SNAPSHOTTING = "snapshotting"
    TRANSFERRING = "transferring"
    VERIFYING = "verifying"
    OPENING_DISKS = "opening_disks"
    BULK_COPYING = "bulk_copying"
    AWAITING_BULK = "awaiting_bulk"
    RECONCILING = "reconciling"
    CUTTING_OVER = "cutting_over"
    CUT_OVER = "cut_over"
    COMMITTING = "committing"
    CREATING_TARGET = "creating_target"
    PARKING = "parking"
    POWERING_ON = "powering_on"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    RUNNING_IN_CLOUD = "running_in_cloud"
    BACK_POWERING_OFF = "back_powering_off"
    BACK_FINAL_EPOCH = "back_final_epoch"
    BACK_REMOVING_CLOUD = "back_removing_cloud"
    BACK_RESTORING_DISKS = "back_restoring_disks"
    BACK_RETURNING = "back_returning"
    MIGRATED_BACK = "migrated_back"
    ROLLING_BACK = "rolling_back"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # Recovery (orchestrator/recovery.py): a component the VM depends on is lost.
    RECOVERY_FENCING = "recovery_fencing"
    RECOVERY_REMOVING_CLOUD = "recovery_removing_cloud"
    RECOVERY_CHECKING_DISKS = "recovery_checking_disks"
    RECOVERY_RETURNING = "recovery_returning"
    RECOVERED = "recovered"
    RECOVERY_FAILED = "recovery_failed"


@dataclass(frozen=True, slots=True)
class Machine:
    """One migration type's table."""

    name: str
    solo: tuple[Step, ...]
    """QUEUED, then the steps each member takes on its own, side by side."""
    together: tuple[Step, ...]
    """Then the steps the group takes together: every member through each in turn."""
    arrive: Step
    """Where the forward path ends (COMPLETED, or a resting step)."""
    no_rollback: frozenset[Step]
    """From these on the group goes on: a cancel or failure no longer rolls it back."""
    back: tuple[Step, ...] = ()
    """The way back from the resting step (migrate back), taken together; ends terminal."""
    resumable: bool = False
    """FAILED may go back to QUEUED (a resume after a failure that kept the data)."""
    entries: tuple[tuple[Step, Step], ...] = ()
    """Ways into this table from another's step (a tbc VM committed goes on as warm)."""
    recover_from: frozenset[Step] = frozenset()
    """Steps at which the VM depends on the cache and the I/O manager: losing one sends it
    down the recovery path (RECOVERY) to its last committed epoch."""

    @property
    def forward(self) -> tuple[Step, ...]:
        return (*self.solo, *self.together, self.arrive)

    @property
    def resting(self) -> Step | None:
        return self.arrive if self.back else None

    @property
    def steps(self) -> frozenset[Step]:
        recovery = (*RECOVERY, *RECOVERY_ENDS) if self.recover_from else ()
        return frozenset((*self.forward, *self.back, *_ENDS, *recovery))

    @property
    def transitions(self) -> dict[Step, frozenset[Step]]:
        return _transitions(self)

    def check(self, machine: str, current: Step, wanted: Step) -> None:
        if wanted not in self.transitions.get(current, frozenset()):
            raise IncorrectState(machine, current.value, wanted.value)

    def next_step(self, current: Step) -> Step:
        """The next step on the happy path (or on the way back)."""
        for path in (self.forward, (self.arrive, *self.back)):
            if current in path[:-1]:
                return path[path.index(current) + 1]
        raise IncorrectState(f"{self.name} migration", current.value, "(next)")

    def rolls_back(self, step: Step) -> bool:
        return step in self.forward[1:] and step not in self.no_rollback


_ENDS = (Step.ROLLING_BACK, Step.FAILED, Step.CANCELLED)


def _transitions(machine: Machine) -> dict[Step, frozenset[Step]]:
    table: dict[Step, set[Step]] = {step: set() for step in Step}
    for path in (machine.forward, (machine.arrive, *machine.back) if machine.back else ()):
        for step, following in itertools.pairwise(path):
            table[step].add(following)
    for step in machine.forward[1:]:
        if machine.rolls_back(step):
            table[step].add(Step.ROLLING_BACK)
    for step, following in machine.entries:
        table[step].add(following)
    if machine.recover_from:
        for step in machine.recover_from:
            table[step].add(RECOVERY[0])
        for step, following in itertools.pairwise(RECOVERY):
            table[step].add(following)
        table[RECOVERY[-1]].update(RECOVERY_ENDS)
    table[Step.QUEUED].add(Step.CANCELLED)
    table[Step.ROLLING_BACK] = {Step.FAILED, Step.CANCELLED}
    if machine.resumable:
        table[Step.FAILED].add(Step.QUEUED)
    return {step: frozenset(nexts) for step, nexts in table.items()}


_START = (Step.QUEUED, Step.PREPARING, Step.POWERING_OFF, Step.SNAPSHOTTING)

RECOVERY = (
    Step.RECOVERY_FENCING,
    Step.RECOVERY_REMOVING_CLOUD,
    Step.RECOVERY_CHECKING_DISKS,
    Step.RECOVERY_RETURNING,
)
"""The way back to the last committed epoch when a component is lost (recovery.py)."""
RECOVERY_ENDS = (Step.RECOVERED, Step.RECOVERY_FAILED)

COLD = Machine(
    name="cold",
    solo=(*_START, Step.TRANSFERRING, Step.VERIFYING),
    together=(Step.CREATING_TARGET, Step.POWERING_ON, Step.FINALIZING),
    arrive=Step.COMPLETED,
    no_rollback=frozenset({Step.FINALIZING, Step.COMPLETED}),
    resumable=True,
)

BACK = (
    Step.BACK_POWERING_OFF,
    Step.BACK_FINAL_EPOCH,
    Step.BACK_REMOVING_CLOUD,
    Step.BACK_RESTORING_DISKS,
    Step.BACK_RETURNING,
    Step.MIGRATED_BACK,
)

TBC = Machine(
    name="tbc",
    solo=(*_START, Step.OPENING_DISKS),
    together=(Step.CREATING_TARGET, Step.PARKING, Step.POWERING_ON),
    arrive=Step.RUNNING_IN_CLOUD,
    no_rollback=frozenset({Step.RUNNING_IN_CLOUD, *BACK}),
    back=BACK,
    recover_from=frozenset(
        {
            Step.OPENING_DISKS,
            Step.CREATING_TARGET,
            Step.PARKING,
            Step.POWERING_ON,
            Step.RUNNING_IN_CLOUD,
            Step.BACK_POWERING_OFF,
            Step.BACK_FINAL_EPOCH,
            Step.BACK_REMOVING_CLOUD,
        }
    ),
)

WARM = Machine(
    name="warm",
    solo=(*_START, Step.OPENING_DISKS),
    together=(
        Step.CREATING_TARGET,
        Step.PARKING,
        Step.POWERING_ON,
        Step.BULK_COPYING,
        Step.AWAITING_BULK,
        Step.RECONCILING,
        Step.CUTTING_OVER,
    ),
    arrive=Step.CUT_OVER,
    no_rollback=frozenset(
        {
            Step.BULK_COPYING,
            Step.AWAITING_BULK,
            Step.RECONCILING,
            Step.CUTTING_OVER,
            Step.CUT_OVER,
            Step.COMMITTING,
            Step.COMPLETED,
        }
    ),
    back=(Step.COMMITTING, Step.COMPLETED),
    entries=((Step.RUNNING_IN_CLOUD, Step.BULK_COPYING),),
    # Before its cutover the VM runs on the cache: caught in the middle, it fails and goes
    # back. From CUTTING_OVER on its volumes hold it (the cutover's own checks): untouched.
    recover_from=frozenset(
        {
            Step.OPENING_DISKS,
            Step.CREATING_TARGET,
            Step.PARKING,
            Step.POWERING_ON,
            Step.BULK_COPYING,
            Step.AWAITING_BULK,
            Step.RECONCILING,
        }
    ),
)

MACHINES: dict[MigrationType, Machine] = {
    MigrationType.COLD: COLD,
    MigrationType.TBC: TBC,
    MigrationType.WARM: WARM,
}


def machine_for(migration_type: MigrationType) -> Machine:
    return MACHINES[migration_type]


# -- cold's table under its old names (and what every machine shares) ------------------------

FORWARD: tuple[Step, ...] = COLD.forward
"""Cold's happy path, in order."""

CUTOVER: frozenset[Step] = frozenset(COLD.together)
"""Steps a cold dependency group takes together, member by member, after all are verified.
A cancel is still honoured before FINALIZING; from there on the group completes."""

TERMINAL: frozenset[Step] = frozenset(
    {Step.COMPLETED, Step.MIGRATED_BACK, Step.FAILED, Step.CANCELLED, *RECOVERY_ENDS}
)

RESTING: frozenset[Step] = frozenset(m.resting for m in MACHINES.values() if m.resting)
"""Steps a migration rests in: it holds no migration slot there."""

MIGRATING_BACK: frozenset[Step] = frozenset(BACK[:-1])

TRANSITIONS: dict[Step, frozenset[Step]] = COLD.transitions


def check_transition(machine: str, current: Step, wanted: Step) -> None:
    COLD.check(machine, current, wanted)


def next_step(current: Step) -> Step:
    """The next step on cold's happy path."""
    return COLD.next_step(current)


def on_components(migration_type: MigrationType, step: Step) -> bool:
    """May the cache and the I/O manager serve this migration's disks at this step?"""
    machine = machine_for(migration_type)
    if Step.OPENING_DISKS not in machine.steps:
        return False
    path = (*machine.forward, *machine.back)
    if step is Step.ROLLING_BACK or step in RECOVERY[:-1]:
        return True
    if step not in path:
        return False
    # tbc: until the way back restores the disks; warm: until its commit closes them.
    last = Step.BACK_RESTORING_DISKS if Step.BACK_RESTORING_DISKS in path else path[-2]
    return path.index(Step.OPENING_DISKS) <= path.index(step) <= path.index(last)


def holds_slot(step: Step) -> bool:
    """Does a migration at this step count against the concurrency limits?"""
    return step is not Step.QUEUED and step not in TERMINAL and step not in RESTING


_PHASES: dict[Step, Phase] = {
    Step.QUEUED: Phase.QUEUED,
    Step.PREPARING: Phase.PREPARE,
    Step.POWERING_OFF: Phase.POWER_OFF,
    Step.SNAPSHOTTING: Phase.SNAPSHOT,
    Step.TRANSFERRING: Phase.TRANSFER,
    Step.VERIFYING: Phase.VERIFY,
    Step.OPENING_DISKS: Phase.OPEN_DISKS,
    Step.BULK_COPYING: Phase.TRANSFER,
    Step.AWAITING_BULK: Phase.AWAIT_BULK_DONE,
    Step.RECONCILING: Phase.TRANSFER,
    Step.CUTTING_OVER: Phase.FINALIZE,
    Step.CUT_OVER: Phase.IN_CLOUD,
    Step.COMMITTING: Phase.FINALIZE,
    Step.CREATING_TARGET: Phase.CREATE_TARGET,
    Step.PARKING: Phase.PARK,
    Step.POWERING_ON: Phase.POWER_ON,
    Step.FINALIZING: Phase.FINALIZE,
    Step.COMPLETED: Phase.DONE,
    Step.RUNNING_IN_CLOUD: Phase.IN_CLOUD,
    **{step: Phase.MIGRATE_BACK for step in BACK[:-1]},
    Step.MIGRATED_BACK: Phase.DONE,
    Step.ROLLING_BACK: Phase.CLEANUP,
    Step.FAILED: Phase.DONE,
    Step.CANCELLED: Phase.DONE,
    **{step: Phase.RECOVER for step in RECOVERY},
    **{step: Phase.DONE for step in RECOVERY_ENDS},
}


def phase_of(step: Step) -> Phase:
    return _PHASES[step]


def public_state(step: Step, cancel_requested: bool) -> MigrationState:
    """What clients see for a step."""
    if step is Step.QUEUED:
        return MigrationState.CANCELLING if cancel_requested else MigrationState.QUEUED
    fixed = {
        Step.COMPLETED: MigrationState.COMPLETED,
        Step.FAILED: MigrationState.FAILED,
        Step.CANCELLED: MigrationState.CANCELLED,
        Step.MIGRATED_BACK: MigrationState.MIGRATED_BACK,
        Step.RUNNING_IN_CLOUD: MigrationState.RUNNING,
        Step.RECOVERED: MigrationState.RECOVERED,
        Step.RECOVERY_FAILED: MigrationState.RECOVERY_FAILED,
    }
    if step in fixed:
        return fixed[step]
    if step in RECOVERY:
        return MigrationState.RECOVERING
    if step in MIGRATING_BACK:
        return MigrationState.MIGRATING_BACK
    if cancel_requested and step not in {Step.FINALIZING, *WARM.no_rollback}:
        return MigrationState.CANCELLING
    return MigrationState.RUNNING
