"""VMs in the cloud and policies, from the command line.

``ferry migrate-back VM... [--power-on] [--keep-snapshot]``, ``ferry commit VM...``,
``ferry sync VM``, ``ferry bulk-done VM --package LOC`` and ``ferry policy set
[--cluster C] [--rto 10m] [--rpo-bytes 10G] [--limits cold=8,in-progress=4,resting=20]
[--bandwidth-mbps N]``. Each prints the appliance's answer as it came: the migrations it
concerns, or its detail; a refusal (``not_implemented`` included) is printed by ``ferry``
with its code, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence

from rich.markup import escape

from clients.client import FerryClient
from clients.migrate import migrations_table
from clients.output import console
from clients.units import parse_duration, parse_size
from messages.commands import MigrationSelector, SetPolicyRequestBody, StatusRequestBody, VmRef
from messages.common import MigrationState
from messages.events import CommandResponse, Event, MigrationStatus, SourceCloneResponse

RECOVERY_DONE = frozenset({MigrationState.RECOVERED, MigrationState.RECOVERY_FAILED})
"""A lost component sent the VM back by itself (the status's ``recovery`` says why)."""
BACK_DONE = frozenset({MigrationState.MIGRATED_BACK, MigrationState.FAILED, *RECOVERY_DONE})
COMMIT_DONE = frozenset({MigrationState.COMPLETED, MigrationState.FAILED, *RECOVERY_DONE})

LIMITS = {
    "cold": "max_concurrent_migrations",
    "in-progress": "max_in_progress_per_cache_node",
    "resting": "max_resting_per_cache_node",
}
"""``--limits`` names: cold in progress; warm/tbc in progress per cache node; VMs resting
in the cloud per cache node."""


def selector(args: argparse.Namespace) -> MigrationSelector:
    """VMs by name (positional), by id (--id), or migrations by id (--migration)."""
    vms = tuple(VmRef(name=name) for name in args.vms) + tuple(VmRef(vm_id=i) for i in args.ids)
    if not vms and not args.migrations:
        raise ValueError("name at least one VM (by name, by id with --id) or --migration")
    return MigrationSelector(migration_ids=tuple(args.migrations), vms=vms)


def parse_limits(text: str) -> dict[str, int]:
    """``cold=8,in-progress=4,resting=20`` (any of them) as SetPolicyRequest fields."""
    fields: dict[str, int] = {}
    for item in text.split(","):
        name, sep, value = item.strip().partition("=")
        if not sep or name not in LIMITS or not value.strip().isdigit():
            raise ValueError(
                f"--limits wants NAME=N[,NAME=N] with NAME one of {', '.join(LIMITS)}; "
                f"not {item.strip()!r}"
            )
        fields[LIMITS[name]] = int(value)
    return fields


def policy_body(args: argparse.Namespace) -> SetPolicyRequestBody:
    fields: dict[str, object] = {"cluster": args.cluster}
    if args.rto is not None:
        fields["rto_rpo_interval_s"] = parse_duration(args.rto)
    if args.rpo_bytes is not None:
        fields["rpo_dirty_bytes"] = parse_size(args.rpo_bytes)
    if args.limits is not None:
        fields.update(parse_limits(args.limits))
    if args.bandwidth_mbps is not None:
        fields["bandwidth_cap_mbps"] = args.bandwidth_mbps
    if len(fields) == 1:
        raise ValueError("policy set: give --rto, --rpo-bytes, --limits or --bandwidth-mbps")
    return SetPolicyRequestBody.model_validate(fields)


def show(answers: Sequence[Event], title: str) -> None:
    """The appliance's answers, as they came."""
    statuses = [a.body for a in answers if isinstance(a, SourceCloneResponse)]
    if statuses:
        console.print(migrations_table(statuses, title))
    for answer in answers:
        if isinstance(answer, CommandResponse):
            verdict = "accepted" if answer.body.accepted else "not accepted"
            console.print(f"{answer.body.command_type} {verdict}: {escape(answer.body.detail)}")
        elif not isinstance(answer, SourceCloneResponse):
            console.print(escape(answer.model_dump_json(indent=2)))


async def cmd_migrate_back(client: FerryClient, args: argparse.Namespace) -> int:
    answers = await client.migrate_back(
        selector(args), power_on=args.power_on, keep_snapshot=args.keep_snapshot
    )
    show(answers, "Migrating back")
    if not args.wait:
        return 0
    statuses = await _until(client, answers, BACK_DONE, args.timeout)
    console.print(migrations_table(statuses, "Back on-prem"))
    return 0 if all(s.state is MigrationState.MIGRATED_BACK for s in statuses) else 1


async def _until(
    client: FerryClient,
    answers: Sequence[Event],
    done: frozenset[MigrationState],
    timeout_s: float,
) -> list[MigrationStatus]:
    """Ask for the answered migrations' status every second until each is in ``done``."""
    ids = tuple(a.body.migration_id for a in answers if isinstance(a, SourceCloneResponse))
    deadline = time.monotonic() + timeout_s
    while True:
        answer = await client.status(StatusRequestBody(migration_ids=ids))
        statuses = list(answer.body.migrations)
        if statuses and all(s.state in done for s in statuses):
            return statuses
        if time.monotonic() > deadline:
            raise TimeoutError(f"not {' or '.join(sorted(done))} within {timeout_s:.0f} s: {ids}")
        await asyncio.sleep(1.0)


async def cmd_commit(client: FerryClient, args: argparse.Namespace) -> int:
    answers = await client.commit(selector(args))
    show(answers, "Committing")
    if not args.wait:
        return 0
    statuses = await _until(client, answers, COMMIT_DONE, args.timeout)
    console.print(migrations_table(statuses, "Committed"))
    return 0 if all(s.state is MigrationState.COMPLETED for s in statuses) else 1


async def cmd_sync(client: FerryClient, args: argparse.Namespace) -> int:
    show(await client.sync(selector(args), timeout_s=args.timeout), "Synced")
    return 0


async def cmd_bulk_done(client: FerryClient, args: argparse.Namespace) -> int:
    show(await client.bulk_done(selector(args), args.package), "Bulk data imported")
    return 0


async def cmd_policy_set(client: FerryClient, args: argparse.Namespace) -> int:
    show([await client.set_policy(policy_body(args))], "Policy")
    return 0


def _selecting(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("vms", nargs="*", metavar="VM_NAME")
    parser.add_argument("--id", dest="ids", action="append", default=[], metavar="VM_ID")
    parser.add_argument(
        "--migration", dest="migrations", action="append", default=[], metavar="MIGRATION_ID"
    )
    return parser


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    back = _selecting(commands.add_parser("migrate-back", help="bring VMs back on-prem"))
    back.add_argument("--power-on", action="store_true", help="power them on once back")
    back.add_argument("--keep-snapshot", action="store_true", help="keep the hdm_N snapshot")
    back.add_argument("--wait", action="store_true", help="until every VM is back on-prem")
    back.add_argument("--timeout", type=float, default=1800.0, help="seconds --wait waits")
    back.set_defaults(func=cmd_migrate_back)
    commit = _selecting(commands.add_parser("commit", help="commit VMs to the cloud"))
    commit.add_argument("--wait", action="store_true", help="until every VM is committed")
    commit.add_argument("--timeout", type=float, default=86400.0, help="seconds --wait waits")
    commit.set_defaults(func=cmd_commit)
    sync = _selecting(
        commands.add_parser("sync", help="a flush epoch now (or resume a failed migration)")
    )
    sync.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for it")
    sync.set_defaults(func=cmd_sync)
    done = _selecting(commands.add_parser("bulk-done", help="an offline package was imported"))
    done.add_argument("--package", required=True, metavar="DIR|s3://BUCKET/PREFIX")
    done.set_defaults(func=cmd_bulk_done)
    policy = commands.add_parser("policy", help="policies").add_subparsers(
        dest="policy_command", required=True
    )
    setting = policy.add_parser("set", help="set the default policy or a cluster's")
    setting.add_argument("--cluster", help="this cluster's policy (default: the default)")
    setting.add_argument("--rto", metavar="DURATION", help="RTO/RPO interval: 90s, 10m, 1h")
    setting.add_argument(
        "--rpo-bytes", metavar="SIZE", help="an epoch at this much dirty: 512M, 10G (2^30), 10GB"
    )
    setting.add_argument("--limits", metavar="cold=N,in-progress=N,resting=N")
    setting.add_argument("--bandwidth-mbps", type=float)
    setting.set_defaults(func=cmd_policy_set)
