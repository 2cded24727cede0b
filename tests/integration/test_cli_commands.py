"""Each ferry command reaches the appliance over SQS (LocalStack) and prints its answer: the
CLI runs as its own process, as an operator runs it; the appliance is a real one with a real
redis-server. A refusal is printed with the refused command's type and the appliance's code
(``not_implemented`` said as such), and ferry exits 1."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from appliance.state.keys import Keys
from appliance.state.policy import Policies, Policy
from appliance.state.store import StateStore, connect
from clients.client import FerryClient, FerryError, FerrySyncClient
from messages.commands import MigrationSelector, SetPolicyRequestBody, StatusRequestBody
from messages.errors import ErrorCode
from messages.events import CommandResponse
from tests.integration.conftest import TOKEN, Harness, RunningAppliance
from tests.support.lab import MIB, NETWORK_MAP, build_lab, lab_vm

StartAppliance = Callable[..., Awaitable[RunningAppliance]]
ROOT = Path(__file__).resolve().parents[2]
REFUSED = re.compile(
    r"^ferry: (\w+) (?:is not implemented by this appliance: |refused by the appliance \(\w+\): )"
)


async def ferry(harness: Harness, *args: str) -> tuple[int, str]:
    """``ferry ARGS`` as a separate process; its exit status and what it printed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")} | {
        "PYTHONPATH": str(ROOT),
        "FERRY_SQS_ENDPOINT": harness.endpoint,
        "FERRY_COMMAND_QUEUE": f"cmd-{harness.suffix}",
        "FERRY_RESPONSE_QUEUE": f"rsp-{harness.suffix}",
        "FERRY_BUS_TOKEN": TOKEN,
        "FERRY_APPLIANCE_KEY": harness.appliance_key,
        "FERRY_RECEIVE_WAIT_S": "1",
        "FERRY_GUEST_PASSWORD": "pw-123",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "clients.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
        cwd=ROOT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout=300)
    assert process.returncode is not None
    return process.returncode, out.decode()


def answered(code: int, out: str, command_type: str) -> bool:
    """The appliance's answer was printed: a table (accepted), or its refusal of this command."""
    if code == 0:
        return True
    found = REFUSED.match(out)
    return code == 1 and found is not None and found.group(1) == command_type


async def test_policy_set_stores_what_it_parsed_and_prints_the_appliance_s_answer(
    harness: Harness, start_appliance: StartAppliance
) -> None:
    await build_lab(harness.data_dir, [])
    running = await start_appliance(harness.settings())
    code, out = await ferry(
        harness,
        "policy", "set", "--cluster", "lab", "--rto", "10m", "--rpo-bytes", "10G",
        "--limits", "cold=3,in-progress=2,resting=12",
    )  # fmt: skip
    status_code, status_out = await ferry(harness, "status")
    refused_code, refused_out = await ferry(harness, "policy", "set", "--rto", "9s")
    store = StateStore(connect(harness.redis_url), Keys(harness.prefix))
    try:
        stored = await Policies(store).own("lab")
    finally:
        await store.close()
    await running.shutdown()
    assert code == 0, out
    assert out.startswith("SetPolicyRequest accepted: policy for lab: ")
    assert "'rto_rpo_interval_s': 600" in out and "'rpo_dirty_bytes': 10737418240" in out
    assert stored == Policy(
        rto_rpo_interval_s=600,
        rpo_dirty_bytes=10 * 2**30,
        max_concurrent_migrations=3,
        max_in_progress_per_cache_node=2,
        max_resting_per_cache_node=12,
    )
    assert status_code == 0 and "policy rto_rpo_interval_s" in status_out
    assert re.search(r"policy max_resting_per_cache_node\s+\S*\s*20", status_out), status_out
    assert refused_code == 1 and "rto_rpo_interval_s" in refused_out  # below 10 s: not sent


async def test_every_migration_command_reaches_the_appliance_and_prints_its_answer(
    harness: Harness, start_appliance: StartAppliance
) -> None:
    vms = [lab_vm(n, disks=1, disk_size=4 * MIB) for n in (1, 2)]
    await build_lab(harness.data_dir, vms)
    running = await start_appliance(harness.settings())
    networks = [f"--network-map={source}={target}" for source, target in NETWORK_MAP.items()]
    code, out = await ferry(
        harness, "migrate", vms[0].name, "--guest-user", "tester", *networks, "--wait"
    )
    assert code == 0, out
    assert "completed" in out and vms[0].name in out
    async with FerryClient(harness.client_settings()) as client:
        (done,) = (await client.status(StatusRequestBody())).body.migrations
    listing_code, listing = await ferry(harness, "migrations")
    assert listing_code == 0 and "RPO lag" in listing
    row = next(line for line in listing.splitlines() if done.migration_id in line)
    assert "cold" in row and "completed" in row

    asked = {
        "SyncRequest": ("sync", "--migration", done.migration_id),
        "CommitRequest": ("commit", "--migration", done.migration_id),
        "MigrateBackRequest": ("migrate-back", "--migration", done.migration_id, "--power-on"),
        "BulkMigrationDoneRequest": (
            "bulk-done", "--migration", done.migration_id, "--package", "s3://bucket/pkg",
        ),
        "SourceCloneRequest": ("migrate", vms[1].name, "--type", "tbc", *networks),
    }  # fmt: skip
    results = {name: await ferry(harness, *args) for name, args in asked.items()}
    offline = await ferry(
        harness, "migrate", vms[1].name, "--type", "warm", "--bulk", "offline",
        "--package", "s3://bucket/pkg", "--request-id", "offline-1", *networks,
    )  # fmt: skip
    await running.shutdown()
    for name, (result, printed) in results.items():
        assert answered(result, printed, name), (name, printed)
    # A completed cold migration is neither resting nor failed: these are refused, never
    # silently accepted.
    for name in ("SyncRequest", "CommitRequest", "MigrateBackRequest"):
        assert results[name][0] == 1, results[name]
    tbc_code, tbc_out = results["SourceCloneRequest"]
    assert tbc_code == 1 or re.search(rf"{vms[1].name}\s.*tbc", tbc_out), tbc_out
    assert answered(*offline, "SourceCloneRequest"), offline


async def test_the_blocking_sdk_sets_policies_and_sends_the_cloud_commands(
    harness: Harness, start_appliance: StartAppliance
) -> None:
    await build_lab(harness.data_dir, [])
    running = await start_appliance(harness.settings())

    def drive() -> tuple[CommandResponse, FerryError]:
        with FerrySyncClient(harness.client_settings()) as client:
            answer = client.set_policy(SetPolicyRequestBody(rpo_dirty_bytes=2 * 2**30))
            try:
                client.commit(MigrationSelector(migration_ids=("m-none",)))
            except FerryError as error:
                return answer, error
            raise AssertionError("a commit of no migration was accepted")

    answer, refused = await asyncio.to_thread(drive)
    await running.shutdown()
    assert answer.body.accepted and "'rpo_dirty_bytes': 2147483648" in answer.body.detail
    assert refused.response.body.command_type == "CommitRequest"
    assert refused.code in (ErrorCode.NOT_IMPLEMENTED, ErrorCode.UNKNOWN_MIGRATION)
