"""The recovery path in the tables: entered only from the steps that depend on the components,
taken step by step, ending in one of two terminal steps clients see as such."""

from __future__ import annotations

import itertools
from dataclasses import replace

from appliance.components.orders import ComponentId
from appliance.orchestrator.record import DiskPlan
from appliance.orchestrator.recovery import Lost, disk_problem
from appliance.orchestrator.states import (
    COLD,
    RECOVERY,
    RECOVERY_ENDS,
    TBC,
    TERMINAL,
    WARM,
    Step,
    holds_slot,
    phase_of,
    public_state,
)
from messages.common import MigrationState, Phase


def test_recovery_is_entered_only_where_the_vm_depends_on_the_components() -> None:
    for machine in (TBC, WARM):
        table = machine.transitions
        entered = {s for s, nexts in table.items() if Step.RECOVERY_FENCING in nexts}
        assert entered == machine.recover_from
        assert table[Step.RECOVERY_RETURNING] == set(RECOVERY_ENDS)
        for step, following in itertools.pairwise(RECOVERY):
            assert table[step] == {following}
    assert Step.RECOVERY_FENCING not in COLD.steps
    # A warm VM from its cutover on runs on its volumes: not sent back.
    for step in (Step.CUTTING_OVER, Step.CUT_OVER, Step.COMMITTING):
        assert Step.RECOVERY_FENCING not in WARM.transitions[step]
    assert Step.RECOVERY_FENCING in TBC.transitions[Step.RUNNING_IN_CLOUD]
    assert Step.RECOVERY_FENCING not in TBC.transitions[Step.BACK_RESTORING_DISKS]


def test_clients_see_recovering_then_recovered_or_recovery_failed() -> None:
    for step in RECOVERY:
        assert public_state(step, False) is MigrationState.RECOVERING
        assert phase_of(step) is Phase.RECOVER and holds_slot(step)
    assert public_state(Step.RECOVERED, False) is MigrationState.RECOVERED
    assert public_state(Step.RECOVERY_FAILED, False) is MigrationState.RECOVERY_FAILED
    assert set(RECOVERY_ENDS) <= TERMINAL


def _disk(**changes: object) -> DiskPlan:
    base = DiskPlan("disk-0", "d0", 4096, True, "m-1-disk-0", onprem_address="127.0.0.1:1")
    return replace(base, **changes)  # type: ignore[arg-type]


def _ok(applied: int, prefix: bool = True) -> dict[str, object]:
    return {"journal": "ok", "applied_epoch": applied, "committed_prefix": prefix}


def test_the_journal_decides_the_pool() -> None:
    disk = _disk(epoch_committed=3)
    assert disk_problem(disk, _ok(3)) is None
    assert disk_problem(disk, _ok(4)) is None
    half = disk_problem(disk, _ok(3, prefix=False))
    assert half is not None and "not applied" in half
    behind = disk_problem(disk, _ok(2))
    assert behind is not None and "3 was committed" in behind
    assert disk_problem(disk, {"journal": "corrupt", "reason": "x"}) is not None
    assert disk_problem(disk, {"journal": "unreachable"}) is not None
    assert disk_problem(disk, {"journal": "absent"}) is not None  # opened, journal gone
    never = _disk(onprem_address=None)
    assert disk_problem(never, {"journal": "absent", "applied_epoch": 0}) is None


def test_a_lost_component_round_trips_through_its_ask() -> None:
    lost = Lost(str(ComponentId("cache", "cache-1")), "its data is lost")
    assert Lost.decode(lost.encode()) == lost
    assert Lost.decode("not json").component == "unknown"
