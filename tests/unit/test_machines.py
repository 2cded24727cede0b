"""One table per migration type: tbc and warm beside cold, shared steps shared."""

from __future__ import annotations

import itertools

import pytest

from appliance.errors import IncorrectState
from appliance.orchestrator.group import ACTIONS
from appliance.orchestrator.scheduler import GroupView
from appliance.orchestrator.states import (
    BACK,
    COLD,
    MACHINES,
    TBC,
    WARM,
    Machine,
    Step,
    holds_slot,
    machine_for,
    on_components,
    phase_of,
    public_state,
)
from appliance.state.migrations import GroupInfo, StoredMigration
from messages.common import MigrationState, MigrationType, Phase

TBC_FORWARD = (
    Step.QUEUED, Step.PREPARING, Step.POWERING_OFF, Step.SNAPSHOTTING, Step.OPENING_DISKS,
    Step.CREATING_TARGET, Step.PARKING, Step.POWERING_ON, Step.RUNNING_IN_CLOUD,
)  # fmt: skip


def test_every_type_has_its_table() -> None:
    assert {t: machine_for(t) for t in MigrationType} == {
        MigrationType.COLD: COLD,
        MigrationType.TBC: TBC,
        MigrationType.WARM: WARM,
    }


def test_tbc_goes_to_the_cloud_rests_and_comes_back_step_by_step() -> None:
    assert TBC.forward == TBC_FORWARD
    assert TBC.resting is Step.RUNNING_IN_CLOUD
    walked = [Step.QUEUED]
    while walked[-1] is not Step.MIGRATED_BACK:
        walked.append(TBC.next_step(walked[-1]))
    assert tuple(walked) == (*TBC_FORWARD, *BACK)
    table = TBC.transitions
    assert table[Step.RUNNING_IN_CLOUD] == {Step.BACK_POWERING_OFF, Step.RECOVERY_FENCING}
    assert table[Step.MIGRATED_BACK] == frozenset()


def test_tbc_rolls_back_only_before_it_runs_in_the_cloud() -> None:
    table = TBC.transitions
    rollback_from = {s for s, nexts in table.items() if Step.ROLLING_BACK in nexts}
    assert rollback_from == set(TBC_FORWARD[1:-1])
    for step in (Step.RUNNING_IN_CLOUD, *BACK):
        assert Step.ROLLING_BACK not in table[step]
    assert table[Step.FAILED] == frozenset()  # no resume: that is cold's out-of-space case


@pytest.mark.parametrize("machine", list(MACHINES.values()), ids=lambda m: m.name)
def test_each_table_refuses_every_other_pair_naming_both_states(machine: Machine) -> None:
    table = machine.transitions
    for current, wanted in itertools.product(Step, Step):
        if wanted in table[current]:
            machine.check("m-1", current, wanted)
            continue
        with pytest.raises(IncorrectState) as raised:
            machine.check("m-1", current, wanted)
        assert repr(current.value) in str(raised.value) and repr(wanted.value) in str(raised.value)


def test_a_cold_step_is_not_a_tbc_step_and_back() -> None:
    with pytest.raises(IncorrectState):
        TBC.check("m-1", Step.SNAPSHOTTING, Step.TRANSFERRING)
    with pytest.raises(IncorrectState):
        COLD.check("m-1", Step.SNAPSHOTTING, Step.OPENING_DISKS)
    with pytest.raises(IncorrectState):
        COLD.check("m-1", Step.COMPLETED, Step.BACK_POWERING_OFF)


def test_shared_steps_are_one_action_and_warm_has_its_own() -> None:
    for step in (Step.PREPARING, Step.POWERING_OFF, Step.SNAPSHOTTING, Step.CREATING_TARGET):
        assert step in COLD.steps and step in TBC.steps and step in ACTIONS
    for step in (Step.BULK_COPYING, Step.RECONCILING, Step.CUTTING_OVER, Step.COMMITTING):
        assert step in WARM.steps and step not in TBC.steps and step in ACTIONS


def test_warm_rests_cut_over_until_a_commit_and_never_rolls_back_once_in_the_cloud() -> None:
    assert WARM.resting is Step.CUT_OVER and not holds_slot(Step.CUT_OVER)
    assert WARM.next_step(Step.POWERING_ON) is Step.BULK_COPYING
    assert WARM.next_step(Step.CUTTING_OVER) is Step.CUT_OVER
    assert WARM.next_step(Step.CUT_OVER) is Step.COMMITTING
    assert WARM.next_step(Step.COMMITTING) is Step.COMPLETED
    assert WARM.rolls_back(Step.POWERING_ON)
    for step in (Step.BULK_COPYING, Step.RECONCILING, Step.CUTTING_OVER, Step.CUT_OVER):
        assert not WARM.rolls_back(step)
    with pytest.raises(IncorrectState):
        WARM.check("m-1", Step.RECONCILING, Step.ROLLING_BACK)
    # A tbc VM committed while resting goes on as warm from there, and only from there.
    WARM.check("m-1", Step.RUNNING_IN_CLOUD, Step.BULK_COPYING)
    with pytest.raises(IncorrectState):
        WARM.check("m-1", Step.RUNNING_IN_CLOUD, Step.RECONCILING)
    with pytest.raises(IncorrectState):
        TBC.check("m-1", Step.RUNNING_IN_CLOUD, Step.BULK_COPYING)


def test_resting_holds_no_slot_and_the_scheduler_counts_none() -> None:
    assert not holds_slot(Step.RUNNING_IN_CLOUD)
    assert holds_slot(Step.OPENING_DISKS) and holds_slot(Step.BACK_FINAL_EPOCH)
    assert not holds_slot(Step.QUEUED) and not holds_slot(Step.MIGRATED_BACK)

    def member(step: Step) -> StoredMigration:
        return StoredMigration(f"m-{step.value}", step.value, "", "{}", False)

    pair = (member(Step.RUNNING_IN_CLOUD),) * 2
    resting = GroupView(GroupInfo("g-1", "r-1", ("a", "b"), 1), pair)
    assert resting.running_vms == 0 and not resting.finished
    going = GroupView(GroupInfo("g-2", "r-2", ("c",), 2), (member(Step.BACK_POWERING_OFF),))
    assert going.running_vms == 1


def test_what_clients_see_of_tbc() -> None:
    assert public_state(Step.RUNNING_IN_CLOUD, False) is MigrationState.RUNNING
    assert phase_of(Step.RUNNING_IN_CLOUD) is Phase.IN_CLOUD
    for step in BACK[:-1]:
        assert public_state(step, True) is MigrationState.MIGRATING_BACK
        assert phase_of(step) is Phase.MIGRATE_BACK
    assert public_state(Step.MIGRATED_BACK, False) is MigrationState.MIGRATED_BACK
    assert phase_of(Step.OPENING_DISKS) is Phase.OPEN_DISKS
    assert phase_of(Step.PARKING) is Phase.PARK


def test_which_steps_run_on_the_components() -> None:
    served = {s for s in Step if on_components(MigrationType.TBC, s)}
    assert served == {
        Step.OPENING_DISKS, Step.CREATING_TARGET, Step.PARKING, Step.POWERING_ON,
        Step.RUNNING_IN_CLOUD, Step.BACK_POWERING_OFF, Step.BACK_FINAL_EPOCH,
        Step.BACK_REMOVING_CLOUD, Step.BACK_RESTORING_DISKS, Step.ROLLING_BACK,
        Step.RECOVERY_FENCING, Step.RECOVERY_REMOVING_CLOUD, Step.RECOVERY_CHECKING_DISKS,
    }  # fmt: skip
    assert not any(on_components(MigrationType.COLD, s) for s in Step)
    # Warm: from the opening of its disks until its commit closes them (a restart asks
    # this of every migration in progress, so no step of it may be left out).
    warm = {s for s in Step if on_components(MigrationType.WARM, s)}
    assert warm == {
        Step.OPENING_DISKS, Step.CREATING_TARGET, Step.PARKING, Step.POWERING_ON,
        Step.BULK_COPYING, Step.AWAITING_BULK, Step.RECONCILING, Step.CUTTING_OVER,
        Step.CUT_OVER, Step.COMMITTING, Step.ROLLING_BACK,
        Step.RECOVERY_FENCING, Step.RECOVERY_REMOVING_CLOUD, Step.RECOVERY_CHECKING_DISKS,
    }  # fmt: skip
