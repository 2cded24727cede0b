"""The cold-migration state machine as data: transitions, the happy path, what clients see."""

from __future__ import annotations

import itertools

import pytest

from appliance.errors import IncorrectState
from appliance.orchestrator.states import (
    COLD,
    CUTOVER,
    FORWARD,
    TERMINAL,
    TRANSITIONS,
    Step,
    check_transition,
    next_step,
    phase_of,
    public_state,
)
from messages.common import MigrationState, Phase

ALLOWED = sorted((current, wanted) for current, nexts in TRANSITIONS.items() for wanted in nexts)
FORBIDDEN = sorted(
    (current, wanted)
    for current, wanted in itertools.product(Step, Step)
    if wanted not in TRANSITIONS[current]
)


def test_the_table_covers_every_step() -> None:
    assert set(TRANSITIONS) == set(Step)


@pytest.mark.parametrize(("current", "wanted"), ALLOWED)
def test_every_listed_transition_is_allowed(current: Step, wanted: Step) -> None:
    check_transition("cold migration", current, wanted)


@pytest.mark.parametrize(("current", "wanted"), FORBIDDEN)
def test_every_other_pair_is_refused_naming_both_states(current: Step, wanted: Step) -> None:
    with pytest.raises(IncorrectState) as raised:
        check_transition("migration m-1", current, wanted)
    message = str(raised.value)
    assert "migration m-1" in message
    assert repr(current.value) in message and repr(wanted.value) in message


def test_the_table_is_the_documented_machine() -> None:
    """Forward one step at a time; rollback from PREPARING..POWERING_ON only; no way out of
    a terminal step; QUEUED may be cancelled outright; FINALIZING can no longer roll back."""
    for current, following in itertools.pairwise(FORWARD):
        assert following in TRANSITIONS[current]
    rollback_from = {s for s, nexts in TRANSITIONS.items() if Step.ROLLING_BACK in nexts}
    assert rollback_from == {
        Step.PREPARING, Step.POWERING_OFF, Step.SNAPSHOTTING, Step.TRANSFERRING,
        Step.VERIFYING, Step.CREATING_TARGET, Step.POWERING_ON,
    }  # fmt: skip
    assert TRANSITIONS[Step.QUEUED] == {Step.PREPARING, Step.CANCELLED}
    assert TRANSITIONS[Step.FINALIZING] == {Step.COMPLETED}
    assert TRANSITIONS[Step.ROLLING_BACK] == {Step.FAILED, Step.CANCELLED}
    # A failure that kept its data may be resumed (SyncRequest); otherwise terminal is final.
    assert TRANSITIONS[Step.FAILED] == {Step.QUEUED}
    for step in TERMINAL - {Step.FAILED}:
        assert TRANSITIONS[step] == frozenset()
    assert len(ALLOWED) + len(FORBIDDEN) == len(Step) ** 2


def test_next_step_walks_the_happy_path_and_stops_at_completed() -> None:
    walked = [Step.QUEUED]
    while walked[-1] is not Step.COMPLETED:
        walked.append(next_step(walked[-1]))
    assert tuple(walked) == FORWARD
    with pytest.raises(IncorrectState, match="'completed'"):
        next_step(Step.COMPLETED)


@pytest.mark.parametrize("step", [Step.ROLLING_BACK, Step.FAILED, Step.CANCELLED])
def test_next_step_is_undefined_off_the_happy_path(step: Step) -> None:
    with pytest.raises((ValueError, IncorrectState)):
        next_step(step)


def test_every_step_has_a_phase() -> None:
    expected = {
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
    assert {step: phase_of(step) for step in expected} == expected
    assert set(expected) == COLD.steps


RUNNING_STEPS = sorted(s for s in COLD.steps if s not in TERMINAL and s is not Step.QUEUED)


@pytest.mark.parametrize("step", RUNNING_STEPS)
def test_steps_in_progress_are_running_and_cancel_turns_them_cancelling(step: Step) -> None:
    assert public_state(step, False) is MigrationState.RUNNING
    expected = MigrationState.RUNNING if step is Step.FINALIZING else MigrationState.CANCELLING
    assert public_state(step, True) is expected


def test_a_cancel_shows_until_finalizing_after_which_the_group_completes() -> None:
    """A cancel is honoured up to POWERING_ON; from FINALIZING on the group completes."""
    for step in CUTOVER - {Step.FINALIZING}:
        assert public_state(step, True) is MigrationState.CANCELLING
    assert public_state(Step.FINALIZING, True) is MigrationState.RUNNING


def test_queued_and_terminal_steps() -> None:
    assert public_state(Step.QUEUED, False) is MigrationState.QUEUED
    assert public_state(Step.QUEUED, True) is MigrationState.CANCELLING
    for cancel in (False, True):
        assert public_state(Step.COMPLETED, cancel) is MigrationState.COMPLETED
        assert public_state(Step.FAILED, cancel) is MigrationState.FAILED
        assert public_state(Step.CANCELLED, cancel) is MigrationState.CANCELLED
