"""The fault suite: each case of tests/faults/cases.py against a real TBC setup.

A case passes when its fault was ridden out as the issue says (repaired in place,
or the VM recovered home), the on-prem image passes the prefix check and no
acknowledged-and-flushed write is lost. Each writes its report row (detection,
repair, migrate back, loss window, counts) to build/faults/rows/; ``make faults``
prints them (tests/faults/report.py).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.faults import scale
from tests.faults.cases import CASES, FaultCase
from tests.faults.harness import StartAppliance, final_check, planned_way_home, running_rig
from tests.faults.rows import row_of, write_row
from tests.integration.conftest import Harness

pytestmark = pytest.mark.timeout(240)


def _param(case: FaultCase) -> object:
    # The recovery cases carry a marker of their own, to run them alone (-m needs_recovery).
    marks = [pytest.mark.needs_recovery] if case.needs_recovery else []
    return pytest.param(case, id=case.name, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
async def test_fault(
    case: FaultCase, harness: Harness, start_appliance: StartAppliance, tmp_path: Path
) -> None:
    async with running_rig(case.environment, harness, start_appliance, tmp_path) as rig:
        await case.inject(rig)
        assert rig.measures.fault_at is not None, "the case never began its fault"
        if not case.needs_recovery:
            await planned_way_home(rig)
        # The heartbeats sent so far read before the appliance stops: a failure shorter
        # than the trip through the queue (a cache restarted at once) is still measured.
        await rig.timeline.caught_up(datetime.now(UTC), scale.WAIT_S)
        checks = await final_check(rig, planned=not case.needs_recovery)
    if rig.measures.detected_at is None:
        rig.measures.detected_at = rig.timeline.first_failed(case.watch, rig.measures.fault_at)
    row = row_of(case.name, case.fault, case.needs_recovery, rig, checks)
    write_row(row)
    print(f"\n{case.name}: {row}  ({scale.describe()})")
    assert row.lost_flushed_writes == 0, row
    assert row.prefix_ok, row
    if case.undetected:
        assert row.detection_s is None, f"reported failed though under the timeout: {row}"
