"""CloneRequests against a real redis-server and a real lab site: checked before anything is made,
made once whatever the redeliveries, credentials sealed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from appliance.clock import FakeClock
from appliance.datapath.buffers import BufferBudget
from appliance.datapath.checkpoint import CheckpointStore
from appliance.datapath.chunks import MAX_DATA_RUN
from appliance.datapath.nbd.channel import NbdAddress
from appliance.embedded import RedisServer
from appliance.errors import CommandRejected, Conflict, InvalidCredentials, UnknownVm
from appliance.orchestrator import steps
from appliance.orchestrator.context import Deps, OrchestratorConfig
from appliance.orchestrator.journal import Journal
from appliance.orchestrator.record import MigrationRecord, load
from appliance.orchestrator.reporting import Reporter
from appliance.orchestrator.requests import CloneRequests, group_id_for, migration_id_for
from appliance.orchestrator.scheduler import group_lease
from appliance.orchestrator.states import Step
from appliance.sealing import Sealer
from appliance.sink import MemorySink
from appliance.sites.lab.site import LabSite
from appliance.state.checkpoints import RedisCheckpointStore
from appliance.state.events import EventLog
from appliance.state.keys import Keys
from appliance.state.leases import Lease, Leases
from appliance.state.migrations import MigrationStore
from appliance.state.policy import Policies
from appliance.state.store import StateStore, connect, text
from messages.commands import (
    CloneOptions,
    CloneVm,
    GuestCredentials,
    NetworkMapping,
    SourceCloneRequest,
    SourceCloneRequestBody,
    TargetResources,
    VmRef,
)
from messages.common import BulkTransferMode, MigrationState, MigrationType, Phase
from messages.errors import ErrorCode
from messages.events import SourceCloneResponse
from messages.keys import ApplianceKeyPair
from tests.support.lab import MIB, build_lab, lab_vm

KEYS = ApplianceKeyPair.generate()
USERNAME = "admin-never-stored-or-echoed"
PASSWORD = "Hunter2-never-stored-in-clear"
VMS = [lab_vm(n, disks=2 if n == 1 else 1, disk_size=4 * MIB) for n in range(1, 5)]


class NoCloud:
    """CloudExports that is never reached: handling a request moves no data."""

    async def export(self, volume_id: str) -> tuple[NbdAddress, str]:
        raise AssertionError(f"export({volume_id}) while handling a request")

    async def unexport(self, volume_id: str) -> None:
        raise AssertionError(f"unexport({volume_id}) while handling a request")


@dataclass
class Env:
    deps: Deps
    clones: CloneRequests
    sink: MemorySink
    redis: aioredis.Redis
    keys: Keys

    @property
    def migrations(self) -> MigrationStore:
        return self.deps.migrations

    async def every_key(self) -> set[str]:
        return {key.decode() async for key in self.redis.scan_iter(match=self.keys.pattern)}

    async def locks(self) -> dict[str, str | None]:
        return {vm.vm_id: await self.migrations.lock_holder("onprem", vm.vm_id) for vm in VMS}


@pytest.fixture
async def env(
    redis: aioredis.Redis, redis_server: RedisServer, keys: Keys, data_dir: Path
) -> AsyncIterator[Env]:
    await build_lab(data_dir, VMS, fill=False)
    sites = {
        "onprem": LabSite.open(data_dir / "sites" / "onprem"),
        "cloud": LabSite.open(data_dir / "sites" / "cloud"),
    }
    store = StateStore(connect(redis_server.url), keys, retry_seconds=0.5, retry_attempts=2)
    clock = FakeClock()
    sink = MemorySink()

    def checkpoints(transfer_id: str, lease: Lease | None) -> CheckpointStore:
        return RedisCheckpointStore(store.redis, store.keys, transfer_id, lease=lease)

    deps = Deps(  # as appliance/service/wiring.py build_deps makes them
        config=OrchestratorConfig(appliance_id="ferry-unit"),
        store=store,
        migrations=MigrationStore(store),
        leases=Leases(store, "ferry-unit", 15.0),
        policies=Policies(store),
        events=EventLog(store),
        reporter=Reporter("ferry-unit", sink, clock),
        sites=dict(sites),
        cloud=NoCloud(),
        checkpoints=checkpoints,
        sealer=Sealer(KEYS),
        clock=clock,
        buffers=BufferBudget(4, MAX_DATA_RUN),
    )
    yield Env(deps, CloneRequests(deps), sink, redis, keys)
    for site in sites.values():
        await site.close()
    await store.close()


def _ref(ref: str) -> VmRef:
    """In these tests ids look like vm-NNNN and names never do (the appliance never guesses)."""
    return VmRef(vm_id=ref) if ref.startswith("vm-") else VmRef(name=ref)


def clone(
    refs: Sequence[str],
    *,
    request_id: str | None = "req-1",
    groups: Sequence[Sequence[str]] = (),
    credentials: bool = True,
    **body: object,
) -> SourceCloneRequest:
    values: dict[str, object] = {
        "request_id": request_id,
        "vms": tuple(CloneVm(**_ref(ref).model_dump(exclude_none=True)) for ref in refs),
        "migration_type": MigrationType.COLD,
        "guest_credentials": GuestCredentials(sealed=KEYS.public.seal_login(USERNAME, PASSWORD))
        if credentials
        else None,
        "network_map": (NetworkMapping(source="prod-app", target="cloud-app"),),
        "application_dependency": tuple(tuple(_ref(ref) for ref in g) for g in groups),
        **body,
    }
    return SourceCloneRequest(body=SourceCloneRequestBody(**values))  # type: ignore[arg-type]


async def records(env: Env, ids: Sequence[str]) -> list[MigrationRecord]:
    return [load(s.record) for s in await env.migrations.get_many(list(ids))]


# --- a request accepted ----------------------------------------------------------------


async def test_a_request_queues_one_migration_per_vm(env: Env) -> None:
    command = clone(
        ["vm-0001", "lnx-test-02", "vm-0003"],
        options=CloneOptions(bandwidth_cap_mbps=80, chunk_size_mib=2),
        target=TargetResources(resource_pool="migrated"),
    )
    answers = await env.clones.handle(command)

    expected_ids = [migration_id_for("req-1", f"vm-000{n}") for n in (1, 2, 3)]
    assert [a.body.migration_id for a in answers] == expected_ids
    for answer in answers:
        assert isinstance(answer, SourceCloneResponse)
        assert answer.correlation_id == command.correlation_id
        assert answer.body.state is MigrationState.QUEUED and answer.body.phase is Phase.QUEUED
        assert answer.body.request_id == "req-1"
    one, two, _ = await records(env, expected_ids)
    assert (one.vm_id, one.vm_name, one.step) == ("vm-0001", "lnx-test-01", Step.QUEUED)
    assert [d.disk_id for d in one.disks] == ["disk-0", "disk-1"]
    assert one.disks[0].volume_id == f"{one.migration_id}-disk-0"
    assert one.network_map == (("prod-app", "cloud-app"),)
    assert one.options.bandwidth_cap_bps == 80 * 125_000
    assert one.options.chunk_size == 2 * MIB
    assert one.target_pool == "migrated" and one.has_credentials
    assert two.vm_id == "vm-0002"  # found by name
    assert await env.migrations.counts() == {"queued": 3}
    assert await env.migrations.request("req-1") == expected_ids
    assert await env.locks() == {
        "vm-0001": expected_ids[0], "vm-0002": expected_ids[1],
        "vm-0003": expected_ids[2], "vm-0004": None,
    }  # fmt: skip
    # Each lone VM is its own group, admitted in the order of the request.
    admissions = [
        (await env.migrations.group(r.group_id)) for r in await records(env, expected_ids)
    ]
    assert [g.members for g in admissions if g] == [(i,) for i in expected_ids]
    assert [g.admission for g in admissions if g] == sorted(g.admission for g in admissions if g)


async def test_the_target_name_comes_from_the_request(env: Env) -> None:
    body = clone(["vm-0001"]).body.model_copy(
        update={"vms": (CloneVm(vm_id="vm-0001", target_name="web-in-cloud"),)}
    )
    (answer,) = await env.clones.handle(SourceCloneRequest(body=body))
    (record,) = await records(env, [answer.body.migration_id])
    assert record.target_name == "web-in-cloud"


async def test_without_a_request_id_the_message_id_is_the_key(env: Env) -> None:
    command = clone(["vm-0001"], request_id=None)
    (answer,) = await env.clones.handle(command)
    assert answer.body.request_id == command.message_id
    assert answer.body.migration_id == migration_id_for(command.message_id, "vm-0001")


async def test_progress_goes_to_the_reply_queue_of_the_request_that_started_it(
    env: Env,
) -> None:
    command = clone(["vm-0001"]).model_copy(update={"reply_to": "client-7-reply"})
    (answer,) = await env.clones.handle(command)
    (record,) = await records(env, [answer.body.migration_id])
    assert record.reply_to == "client-7-reply"  # stored, so every later progress goes there
    await env.deps.reporter.publish(record)
    assert env.sink.reply_to == ["client-7-reply"]
    assert env.sink.events[0].correlation_id == command.correlation_id


# --- rejected before anything is made -----------------------------------------------------


async def test_an_unknown_vm_rejects_the_whole_request(env: Env) -> None:
    with pytest.raises(UnknownVm) as raised:
        await env.clones.handle(clone(["vm-0001", "vm-0999", "vm-0002"]))
    assert raised.value.code is ErrorCode.UNKNOWN_VM and "vm-0999" in str(raised.value)
    assert await env.every_key() == set()
    assert env.sink.events == []


async def test_a_vm_already_migrating_is_a_conflict_and_no_lock_leaks(env: Env) -> None:
    (first,) = await env.clones.handle(clone(["vm-0003"], request_id="req-first"))
    before = await env.every_key()

    with pytest.raises(Conflict) as raised:
        # vm-0001 and vm-0002 are locked before vm-0003 is found taken; vm-0004 never is.
        await env.clones.handle(
            clone(["vm-0001", "vm-0002", "vm-0003", "vm-0004"], request_id="req-second")
        )
    assert raised.value.code is ErrorCode.CONFLICT
    assert "vm-0003" in str(raised.value) and first.body.migration_id in str(raised.value)
    assert await env.locks() == {
        "vm-0001": None, "vm-0002": None, "vm-0003": first.body.migration_id, "vm-0004": None,
    }  # fmt: skip
    assert await env.every_key() == before
    assert await env.migrations.request("req-second") is None
    assert await env.migrations.counts() == {"queued": 1}
    # Once refused, the free VMs can be asked for again.
    again = await env.clones.handle(clone(["vm-0001", "vm-0002"], request_id="req-third"))
    assert len(again) == 2


async def test_a_dependency_group_becomes_one_group_and_a_lone_vm_another(env: Env) -> None:
    answers = await env.clones.handle(
        clone(["vm-0001", "lnx-test-02", "vm-0003"], groups=[["lnx-test-02", "vm-0001"]])
    )
    by_vm = {a.body.vm_id: a.body for a in answers}
    together = group_id_for("req-1", ["vm-0001", "vm-0002"])
    alone = group_id_for("req-1", ["vm-0003"])
    assert by_vm["vm-0001"].group_id == by_vm["vm-0002"].group_id == together
    assert by_vm["vm-0003"].group_id == alone
    assert await env.migrations.active_groups() == [together, alone]
    pair = await env.migrations.group(together)
    single = await env.migrations.group(alone)
    assert pair is not None and single is not None
    assert set(pair.members) == {by_vm["vm-0001"].migration_id, by_vm["vm-0002"].migration_id}
    assert single.members == (by_vm["vm-0003"].migration_id,)
    assert pair.admission < single.admission
    pair_records = await records(env, list(pair.members))
    assert {r.admission for r in pair_records} == {pair.admission}


async def test_a_group_names_its_members_as_the_request_does(env: Env) -> None:
    answers = await env.clones.handle(
        clone(["lnx-test-01", "vm-0002"], groups=[["lnx-test-01", "vm-0002"]])
    )
    assert len({a.body.group_id for a in answers}) == 1
    with pytest.raises(CommandRejected, match="not in the request"):
        await env.clones.handle(
            clone(["vm-0001", "vm-0002"], groups=[["lnx-test-01", "lnx-test-02"]], request_id="r2")
        )


@pytest.mark.parametrize(
    ("refs", "groups", "complaint"),
    [
        (["vm-0001", "vm-0002"], [["vm-0001", "vm-0004"]], "'vm-0004', not in the request"),
        (["vm-0001", "vm-0002"], [["vm-0001", "vm-0999"]], "'vm-0999', not in the request"),
        (
            ["vm-0001", "vm-0002", "vm-0003"],
            [["vm-0001", "vm-0002"], ["vm-0002", "vm-0003"]],
            "in two dependency groups",
        ),
        (["vm-0001", "lnx-test-01"], [], "named twice"),
    ],
)
async def test_inconsistent_groups_reject_the_request(
    env: Env, refs: list[str], groups: list[list[str]], complaint: str
) -> None:
    with pytest.raises(CommandRejected, match=complaint) as raised:
        await env.clones.handle(clone(refs, groups=groups))
    assert raised.value.code is ErrorCode.INVALID_REQUEST
    assert await env.every_key() == set()


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        # tbc and warm need the cache and the I/O manager running: none beats here.
        ({"migration_type": MigrationType.WARM}, ErrorCode.UNAVAILABLE),
        ({"migration_type": MigrationType.TBC}, ErrorCode.UNAVAILABLE),
        # An offline bulk transfer is a warm migration's, to a package location.
        ({"bulk_transfer_mode": BulkTransferMode.OFFLINE}, ErrorCode.INVALID_REQUEST),
        (
            {"migration_type": MigrationType.WARM, "bulk_transfer_mode": BulkTransferMode.OFFLINE},
            ErrorCode.INVALID_REQUEST,
        ),
        ({"target": TargetResources(site="elsewhere")}, ErrorCode.INVALID_REQUEST),
    ],
)
async def test_what_is_not_available_yet_is_refused_with_its_code(
    env: Env, changes: dict[str, Any], code: ErrorCode
) -> None:
    with pytest.raises(CommandRejected) as raised:
        await env.clones.handle(clone(["vm-0001"], **changes))
    assert raised.value.code is code
    assert await env.every_key() == set()


# --- once, whatever the redeliveries ----------------------------------------------------


async def test_the_same_request_twice_makes_nothing_new(env: Env) -> None:
    first = await env.clones.handle(clone(["vm-0001", "vm-0002"], groups=[["vm-0001", "vm-0002"]]))
    keys_before = await env.every_key()
    admission_before = await env.redis.get(env.keys.admission)

    resent = clone(["vm-0001", "vm-0002"], groups=[["vm-0001", "vm-0002"]])  # a new message id
    second = await env.clones.handle(resent)

    assert [a.body.migration_id for a in second] == [a.body.migration_id for a in first]
    assert all(a.correlation_id == resent.correlation_id for a in second)
    assert await env.every_key() == keys_before
    assert await env.redis.get(env.keys.admission) == admission_before
    assert await env.migrations.counts() == {"queued": 2}


async def test_a_resent_request_answers_the_first_even_if_it_differs(env: Env) -> None:
    """The request id is the idempotency key: the first request's migrations are the answer."""
    first = await env.clones.handle(clone(["vm-0001"]))
    second = await env.clones.handle(clone(["vm-0001", "vm-0002"]))
    assert [a.body.migration_id for a in second] == [a.body.migration_id for a in first]
    assert await env.migrations.lock_holder("onprem", "vm-0002") is None


async def test_a_handler_that_died_before_recording_the_request_is_finished_by_the_next(
    env: Env,
) -> None:
    """Locks, records and groups were made, but the crash came before the request was claimed."""
    first = await env.clones.handle(clone(["vm-0001", "vm-0002"]))
    await env.redis.delete(env.keys.request("req-1"))

    second = await env.clones.handle(clone(["vm-0001", "vm-0002"]))
    assert [a.body.migration_id for a in second] == [a.body.migration_id for a in first]
    assert await env.migrations.counts() == {"queued": 2}
    assert len(await env.migrations.active_groups()) == 2


async def test_two_deliveries_handled_at_once_make_one_set_of_migrations(env: Env) -> None:
    await asyncio.gather(
        env.clones.handle(clone(["vm-0001", "vm-0002"])),
        env.clones.handle(clone(["vm-0001", "vm-0002"])),
    )
    assert await env.migrations.counts() == {"queued": 2}


# --- credentials ------------------------------------------------------------------------


async def dump_everything(env: Env) -> dict[str, bytes]:
    """Every key of the prefix as Redis serialises it (DUMP) and as its values read back."""
    redis = env.redis
    readers: dict[str, Callable[[str], Awaitable[Any]]] = {
        "string": redis.get,
        "hash": redis.hgetall,
        "zset": lambda key: redis.zrange(key, 0, -1),
        "stream": redis.xrange,
    }
    found: dict[str, bytes] = {}
    for key in await env.every_key():
        kind = text(await redis.type(key))
        assert kind in readers, f"unexpected {kind} at {key}"
        dumped = await redis.dump(key) or b""
        found[key] = bytes(dumped) + b"\n" + repr(await readers[kind](key)).encode()
    return found


async def test_guest_credentials_are_sealed_never_stored_in_clear(env: Env) -> None:
    command = clone(["vm-0001", "vm-0002"])
    answers = await env.clones.handle(command)

    stored = await dump_everything(env)
    assert stored  # the scan saw the request's keys
    for key, content in stored.items():
        assert PASSWORD.encode() not in content, key
        assert USERNAME.encode() not in content, key
    for answer in [*answers, *env.sink.events]:
        assert PASSWORD not in answer.model_dump_json(context={"wire": True})
        assert USERNAME not in answer.model_dump_json(context={"wire": True})
    # Kept exactly as the client sealed it: ciphertext only this appliance's key opens.
    assert command.body.guest_credentials is not None
    for answer in answers:
        sealed = await env.redis.get(env.keys.secret(answer.body.migration_id))
        assert sealed is not None and text(sealed) == command.body.guest_credentials.sealed
        with env.deps.sealer.opened(text(sealed)) as login:
            assert (login.username, login.password) == (USERNAME, PASSWORD)
        with pytest.raises(InvalidCredentials):
            Sealer(ApplianceKeyPair.generate()).check(text(sealed))
        assert await env.redis.ttl(env.keys.secret(answer.body.migration_id)) > 0


@pytest.mark.parametrize(
    ("sealed", "why"),
    [
        (ApplianceKeyPair.generate().public.seal_login(USERNAME, PASSWORD), "another key"),
        (KEYS.public.seal(json.dumps({"username": USERNAME, "password": ""}).encode()), "empty"),
        (KEYS.public.seal(json.dumps({"username": "", "password": PASSWORD}).encode()), "empty"),
        (KEYS.public.seal(b"not json at all, but long enough to be a box"), "not JSON"),
        (KEYS.public.seal(json.dumps({"user": USERNAME, "pw": PASSWORD}).encode()), "fields"),
    ],
)
async def test_credentials_that_cannot_be_used_are_refused_at_request_time(
    env: Env, sealed: str, why: str
) -> None:
    command = clone(["vm-0001"])
    command = command.model_copy(
        update={
            "body": command.body.model_copy(
                update={"guest_credentials": GuestCredentials(sealed=sealed)}
            )
        }
    )
    with pytest.raises(InvalidCredentials) as raised:
        await env.clones.handle(command)
    assert raised.value.code is ErrorCode.INVALID_CREDENTIALS, why
    assert USERNAME not in str(raised.value) and PASSWORD not in str(raised.value)
    assert not await env.every_key(), "nothing is made for a refused request"


async def prepare_once(env: Env, migration_id: str) -> tuple[Journal, MigrationRecord]:
    """Admit the migration (as the scheduler does, under its group's lease) and run prepare."""
    (record,) = await records(env, [migration_id])
    lease = await env.deps.leases.acquire(group_lease(record.group_id))
    assert lease is not None
    journal = Journal(env.deps, lease)
    record = await journal.advance(record, Step.PREPARING)
    return journal, await steps.prepare(env.deps, journal, record)


async def test_prepare_uses_the_credentials_then_drops_them(env: Env, data_dir: Path) -> None:
    (answer,) = await env.clones.handle(clone(["vm-0001"]))
    _, prepared = await prepare_once(env, answer.body.migration_id)
    assert prepared.checks and all(c.passed for c in prepared.checks)
    assert await env.redis.get(env.keys.secret(prepared.migration_id)) is None
    vm = await env.deps.site("onprem").get_vm("vm-0001")
    assert ("ferry.guest_prepared", "true") in vm.annotations
    written = [path for path in data_dir.rglob("*") if path.is_file()]
    assert written
    assert not [p for p in written if PASSWORD.encode() in p.read_bytes()]
    assert not [p for p in written if USERNAME.encode() in p.read_bytes()]


async def test_prepare_run_again_after_a_crash_still_passes(env: Env) -> None:
    (answer,) = await env.clones.handle(clone(["vm-0001"]))
    journal, prepared = await prepare_once(env, answer.body.migration_id)
    # The appliance dies here, before POWERING_OFF is written: on resume the step runs again.
    again = await steps.prepare(env.deps, journal, prepared)
    assert all(c.passed for c in again.checks)


async def test_without_credentials_nothing_is_sealed(env: Env) -> None:
    (answer,) = await env.clones.handle(clone(["vm-0001"], credentials=False))
    assert await env.redis.get(env.keys.secret(answer.body.migration_id)) is None
    (record,) = await records(env, [answer.body.migration_id])
    assert not record.has_credentials
