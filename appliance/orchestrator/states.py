"""The cold-migration state machine, as data.

    QUEUED ─▶ PREPARING ─▶ POWERING_OFF ─▶ SNAPSHOTTING ─▶ TRANSFERRING ─▶ VERIFYING
                                                                              │
      COMPLETED ◀─ FINALIZING ◀─ POWERING_ON ◀─ CREATING_TARGET ◀────────────┘
    any step before FINALIZING ─▶ ROLLING_BACK ─▶ FAILED | CANCELLED
    QUEUED ─▶ CANCELLED
    FAILED ─▶ QUEUED        a resume (SyncRequest), only when the failure kept the data

Pure functions only: what comes next, what clients see. The runner persists
every transition (compare-and-set on the expected step) before acting on it.
"""

from __future__ import annotations

import itertools
from enum import StrEnum

from appliance.errors import IncorrectState
from messages.common import MigrationState, Phase


class Step(StrEnum):
    QUEUED = "queued"
    PREPARING = "preparing"
    POWERING_OFF = "powering_off"
    SNAPSHOTTING = "snapshotting"
    TRANSFERRING = "transferring"
    VERIFYING = "verifying"
    CREATING_TARGET = "creating_target"
    POWERING_ON = "powering_on"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    ROLLING_BACK = "rolling_back"
    FAILED = "failed"
    CANCELLED = "cancelled"


FORWARD: tuple[Step, ...] = (
    Step.QUEUED,
    Step.PREPARING,
    Step.POWERING_OFF,
    Step.SNAPSHOTTING,
    Step.TRANSFERRING,
    Step.VERIFYING,
    Step.CREATING_TARGET,
    Step.POWERING_ON,
    Step.FINALIZING,
    Step.COMPLETED,
)
"""The happy path, in order."""

CUTOVER: frozenset[Step] = frozenset({Step.CREATING_TARGET, Step.POWERING_ON, Step.FINALIZING})
"""Steps a dependency group takes together, member by member, after all are verified.
A cancel is still honoured before FINALIZING; from there on the group completes."""

TERMINAL: frozenset[Step] = frozenset({Step.COMPLETED, Step.FAILED, Step.CANCELLED})

RESTING: frozenset[Step] = frozenset()
"""Steps in which a warm or tbc VM rests in the cloud (*running in cloud*): it holds no
migration slot, only a place on its cache node (orchestrator/limits.py). The warm and
tbc machines name theirs here."""

_ROLLBACK_FROM = frozenset(FORWARD[1:8])  # PREPARING .. POWERING_ON

TRANSITIONS: dict[Step, frozenset[Step]] = {
    **{
        step: frozenset({following} | ({Step.ROLLING_BACK} if step in _ROLLBACK_FROM else set()))
        for step, following in itertools.pairwise(FORWARD)
    },
    Step.QUEUED: frozenset({Step.PREPARING, Step.CANCELLED}),
    Step.ROLLING_BACK: frozenset({Step.FAILED, Step.CANCELLED}),
    Step.COMPLETED: frozenset(),
    Step.FAILED: frozenset({Step.QUEUED}),
    Step.CANCELLED: frozenset(),
}


def check_transition(machine: str, current: Step, wanted: Step) -> None:
    if wanted not in TRANSITIONS[current]:
        raise IncorrectState(machine, current.value, wanted.value)


def next_step(current: Step) -> Step:
    """The next step on the happy path."""
    index = FORWARD.index(current) if current in FORWARD else len(FORWARD)
    if index + 1 >= len(FORWARD):
        raise IncorrectState("cold migration", current.value, "(next)")
    return FORWARD[index + 1]


_PHASES: dict[Step, Phase] = {
    Step.QUEUED: Phase.QUEUED,
    Step.PREPARING: Phase.PREPARE,
    Step.POWERING_OFF: Phase.POWER_OFF,
    Step.SNAPSHOTTING: Phase.SNAPSHOT,
    Step.TRANSFERRING: Phase.TRANSFER,
    Step.VERIFYING: Phase.VERIFY,
    Step.CREATING_TARGET: Phase.CREATE_TARGET,
    Step.POWERING_ON: Phase.POWER_ON,
    Step.FINALIZING: Phase.FINALIZE,
    Step.COMPLETED: Phase.DONE,
    Step.ROLLING_BACK: Phase.CLEANUP,
    Step.FAILED: Phase.DONE,
    Step.CANCELLED: Phase.DONE,
}


def phase_of(step: Step) -> Phase:
    return _PHASES[step]


def public_state(step: Step, cancel_requested: bool) -> MigrationState:
    """What clients see for a step."""
    if step is Step.QUEUED:
        return MigrationState.CANCELLING if cancel_requested else MigrationState.QUEUED
    if step is Step.COMPLETED:
        return MigrationState.COMPLETED
    if step is Step.FAILED:
        return MigrationState.FAILED
    if step is Step.CANCELLED:
        return MigrationState.CANCELLED
    if cancel_requested and step is not Step.FINALIZING:
        return MigrationState.CANCELLING
    return MigrationState.RUNNING
