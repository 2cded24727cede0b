"""Commands about VMs in the cloud, against a real redis-server: a tbc VM asked to commit has
no way back, whether it still rests or has already gone on as warm."""

from __future__ import annotations

import pytest

from appliance.errors import WrongStep
from appliance.orchestrator.cloud_control import CloudCommands
from appliance.orchestrator.journal import Journal
from appliance.orchestrator.scheduler import group_lease
from appliance.orchestrator.states import Step
from messages.commands import MigrateBackRequestBody, MigrationSelector
from messages.common import MigrationType
from messages.errors import ErrorCode
from tests.unit.test_clone_requests import Env, clone, env, records
from tests.unit.test_volume_names import _components_alive

__all__ = ["env"]  # the fixture


@pytest.mark.parametrize("step", [Step.RUNNING_IN_CLOUD, Step.BULK_COPYING, Step.RECONCILING])
async def test_a_migrate_back_after_a_commit_is_cut_over_at_any_step(env: Env, step: Step) -> None:
    """The commit turns the resting tbc VM into a warm one at once (its run may be quicker
    than the next command): the answer is cut_over either way, never not_resting."""
    await _components_alive(env)
    (answer,) = await env.clones.handle(clone(["vm-0003"], migration_type=MigrationType.TBC))
    (record,) = await records(env, [answer.body.migration_id])
    lease = await env.deps.leases.acquire(group_lease(record.group_id))
    assert lease is not None
    kind = MigrationType.TBC if step is Step.RUNNING_IN_CLOUD else MigrationType.WARM
    await Journal(env.deps, lease).update(record, step=step, migration_type=kind)
    await env.migrations.ask(record.migration_id, "commit", "1")
    body = MigrateBackRequestBody(select=MigrationSelector(migration_ids=(record.migration_id,)))
    with pytest.raises(WrongStep) as refused:
        await CloudCommands(env.deps).migrate_back([record.migration_id], body)
    assert refused.value.code is ErrorCode.CUT_OVER
