"""What a reset makes of each unfinished migration, by its type and step (reset_return)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from appliance.orchestrator.record import MigrationRecord, TransferOptions
from appliance.orchestrator.reset_return import (
    KEPT_IN_CLOUD,
    RETURNED,
    ROLLBACK,
    Handling,
    how_handled,
    served,
)
from appliance.orchestrator.states import Step
from appliance.orchestrator.warm import SWAPPED
from messages.common import MigrationType


def _record(kind: MigrationType, step: Step) -> MigrationRecord:
    return MigrationRecord(
        migration_id="m-1", request_id="r", correlation_id="c", group_id="g-1", admission=1,
        site="onprem", vm_id="vm-1", vm_name="vm-1", migration_type=kind, step=step,
        target_site="cloud", target_pool=None, target_name="vm-1", network_map=(),
        options=TransferOptions(), disks=(),
    )  # fmt: skip


TBC, WARM, COLD = MigrationType.TBC, MigrationType.WARM, MigrationType.COLD


@pytest.mark.parametrize(
    ("kind", "step"),
    [
        (COLD, Step.TRANSFERRING),  # no components: the sites' undo only
        (TBC, Step.QUEUED),
        (TBC, Step.SNAPSHOTTING),  # its disks were never opened
        (TBC, Step.MIGRATED_BACK),
        (WARM, Step.COMPLETED),
    ],
)
def test_what_never_reached_the_components_or_is_over_is_not_theirs(
    kind: MigrationType, step: Step
) -> None:
    assert not served(_record(kind, step))


@pytest.mark.parametrize(
    ("kind", "step", "how"),
    [
        (TBC, Step.OPENING_DISKS, ROLLBACK),  # not yet in the cloud: undone as a rollback
        (TBC, Step.POWERING_ON, ROLLBACK),
        (TBC, Step.ROLLING_BACK, ROLLBACK),
        (TBC, Step.RUNNING_IN_CLOUD, RETURNED),
        (TBC, Step.BACK_FINAL_EPOCH, RETURNED),  # mid migrate back: no final epoch now
        (TBC, Step.BACK_RETURNING, RETURNED),
        (WARM, Step.BULK_COPYING, RETURNED),
        (WARM, Step.RECONCILING, RETURNED),
        (WARM, Step.CUTTING_OVER, RETURNED),  # its disks not yet on the volumes
        (WARM, Step.CUT_OVER, KEPT_IN_CLOUD),
        (WARM, Step.COMMITTING, KEPT_IN_CLOUD),
    ],
)
def test_a_vm_the_components_serve_goes_home_unless_it_cut_over(
    kind: MigrationType, step: Step, how: Handling
) -> None:
    record = _record(kind, step)
    assert served(record)
    assert how_handled(record) == how


def test_a_cutover_that_swapped_the_disks_keeps_the_vm_in_the_cloud() -> None:
    record = _record(WARM, Step.CUTTING_OVER)
    assert how_handled(replace(record, extra={SWAPPED: True})) == KEPT_IN_CLOUD
