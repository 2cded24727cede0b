"""Tests only: places where a warm VM holds until told to go on, so a crash test kills the
appliance at a known point (``OrchestratorConfig.holds``, ``FERRY_DEBUG_WARM_HOLDS``).

At a hold the run appends the event ``held`` (``point``) to the migration's event log,
then waits for the ask ``<point>_go``. A run that reaches the same hold again (after a
restart) appends it again and goes on at once when the ask was given.
"""

from __future__ import annotations

from appliance.logs import get_logger
from appliance.orchestrator.context import Deps
from appliance.orchestrator.record import MigrationRecord

log = get_logger(__name__)

EXPORT = "export"  # an offline package, with its first chunks stored (warm_offline.py)
COMMIT = "commit"  # the components' disks closed, the snapshot not yet deleted (warm.py)


def holding(deps: Deps, point: str) -> bool:
    return point in deps.config.holds


async def hold(deps: Deps, record: MigrationRecord, point: str) -> None:
    """Hold here until the ask ``<point>_go`` (only when the settings ask for it)."""
    if not holding(deps, point):
        return
    now = deps.clock.now().isoformat()
    await deps.events.append("held", now, record.migration_id, point=point)
    log.info("held", migration_id=record.migration_id, point=point)
    while f"{point}_go" not in await deps.migrations.asks(record.migration_id):
        await deps.clock.sleep(deps.config.resting_poll_s)
