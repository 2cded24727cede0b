"""A VM is never left locked for ever: not by a request that died, nor by a finished migration.

Against a real redis-server and a real lab site (the clone-request fixture).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import pytest

from appliance.dispatch.delivery import Delivery, Verdict
from appliance.dispatch.dispatcher import Dispatcher
from appliance.errors import Conflict
from appliance.orchestrator.requests import CloneRequests, migration_id_for
from appliance.orchestrator.states import Step
from appliance.state.commands import CommandRecords
from appliance.state.events import EventLog
from appliance.state.migrations import MigrationStore, NewMigration
from messages.codec import Decoder, encode
from messages.commands import Command
from messages.common import MigrationState
from messages.events import ErrorResponse, Event
from tests.unit import test_clone_requests as clone_env
from tests.unit.test_clone_requests import Env, clone
from tests.unit.test_dispatcher import TOKEN

env = clone_env.env  # the same fixture: a real Redis, a real lab site, the real handler

VM_IDS = ["vm-0001", "vm-0002"]


class BrokenStore(MigrationStore):
    """Creating the records fails with a defect: after the VMs were locked, before any record."""

    async def create_group(self, *args: Any, **kwargs: Any) -> bool:
        raise RuntimeError("injected defect while creating the records")


def dispatcher_for(env: Env, clones: CloneRequests) -> Dispatcher:
    async def answer_clone(command: Command) -> Sequence[Event]:
        assert command.message_type == "SourceCloneRequest"
        return await clones.handle(command)  # type: ignore[arg-type]

    return Dispatcher(
        appliance_id="ferry-unit",
        decoder=Decoder(TOKEN),
        records=CommandRecords(env.deps.store, ttl_s=3600),
        events=EventLog(env.deps.store),
        sink=env.sink,
        handlers={"SourceCloneRequest": answer_clone},
        clock=env.deps.clock,
        max_skew=timedelta(minutes=5),
    )


async def test_a_dead_lettered_request_releases_the_locks_it_took(env: Env) -> None:
    broken = CloneRequests(dataclasses.replace(env.deps, migrations=BrokenStore(env.deps.store)))
    command = clone(VM_IDS, request_id="req-dies")
    body = encode(command.model_copy(update={"sent_at": env.deps.clock.now()}), TOKEN)

    verdict = await dispatcher_for(env, broken).handle(Delivery("sqs-1", "r-1", body, 1))

    assert verdict is Verdict.DEAD_LETTER
    assert isinstance(env.sink.events[-1], ErrorResponse)
    assert await env.migrations.request("req-dies") is None  # nothing was created...
    assert await env.locks() == dict.fromkeys(("vm-0001", "vm-0002", "vm-0003", "vm-0004"))
    # ...and the VMs are free for the next request at once.
    answers = await env.clones.handle(clone(VM_IDS, request_id="req-next"))
    assert [a.body.state for a in answers] == [MigrationState.QUEUED] * 2


async def test_a_lock_whose_migration_never_came_to_be_lapses(env: Env) -> None:
    """The handler was killed between locking and creating: nobody is left to release."""
    pending_s = env.deps.config.vm_lock_pending_s
    orphan = migration_id_for("req-killed", "vm-0001")
    await env.migrations.lock_vm(
        "onprem", "vm-0001", orphan, pending_s=pending_s, finished=("completed",)
    )
    key = env.keys.vm_lock("onprem", "vm-0001")
    assert 0 < await env.redis.pttl(key) <= pending_s * 1000
    with pytest.raises(Conflict, match=orphan):
        await env.clones.handle(clone(["vm-0001"], request_id="req-meanwhile"))

    await env.redis.delete(key)  # its pending time ran out: what Redis then does by itself
    (answer,) = await env.clones.handle(clone(["vm-0001"], request_id="req-later"))
    assert answer.body.state is MigrationState.QUEUED
    # Once the migration exists, its lock no longer lapses.
    assert await env.migrations.lock_holder("onprem", "vm-0001") == answer.body.migration_id
    assert await env.redis.pttl(key) == -1


async def test_a_redelivered_request_finds_its_own_pending_lock(env: Env) -> None:
    mine = migration_id_for("req-1", "vm-0001")
    await env.migrations.lock_vm("onprem", "vm-0001", mine, pending_s=60, finished=())
    (answer,) = await env.clones.handle(clone(["vm-0001"], request_id="req-1"))
    assert answer.body.migration_id == mine and answer.body.state is MigrationState.QUEUED
    assert await env.redis.pttl(env.keys.vm_lock("onprem", "vm-0001")) == -1


async def test_a_finished_migration_s_lock_is_free(env: Env) -> None:
    (first,) = await env.clones.handle(clone(["vm-0001"], request_id="req-1"))
    stored = await env.migrations.get(first.body.migration_id)
    assert stored is not None
    with pytest.raises(Conflict):  # still queued: the VM is taken
        await env.clones.handle(clone(["vm-0001"], request_id="req-2"))

    record = json.loads(stored.record) | {"step": Step.COMPLETED.value}
    await env.migrations.transition(
        first.body.migration_id,
        expected=Step.QUEUED.value,
        step=Step.COMPLETED.value,
        old_public="queued",
        public="completed",
        record=json.dumps(record),
        lease=None,
    )
    (second,) = await env.clones.handle(clone(["vm-0001"], request_id="req-3"))
    assert second.body.state is MigrationState.QUEUED
    assert await env.migrations.lock_holder("onprem", "vm-0001") == second.body.migration_id


async def test_a_permanent_lock_naming_no_migration_is_free(env: Env) -> None:
    """Left by older versions, or by a record lost with its Redis: it guards nothing."""
    await env.redis.set(env.keys.vm_lock("onprem", "vm-0001"), "m-gone")
    (answer,) = await env.clones.handle(clone(["vm-0001"], request_id="req-1"))
    assert answer.body.state is MigrationState.QUEUED
    assert await env.migrations.lock_holder("onprem", "vm-0001") == answer.body.migration_id


async def test_a_lock_taken_by_another_migration_meanwhile_refuses_creation(env: Env) -> None:
    """The pending lock lapsed and another request took the VM: the group is not created."""
    lock = env.keys.vm_lock("onprem", "vm-0001")
    await env.redis.set(lock, "m-other-live", px=60_000)
    member = NewMigration("m-late", "queued", "queued", "{}", vm_lock=("onprem", "vm-0001"))
    with pytest.raises(Conflict):
        await env.migrations.create_group("g-late", "req-late", 1, [member])
    assert await env.redis.get(lock) == b"m-other-live"
    assert await env.migrations.get("m-late") is None
    assert await env.migrations.group("g-late") is None
