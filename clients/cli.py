"""``ferry``: the operator's command line (inventory, status, watch, health, events, reset)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError
from rich.markup import escape
from rich.table import Table

from clients import cloud, health, reset
from clients.client import FerryClient, FerryError, NoAnswer
from clients.config import ClientSettings
from clients.migrate import add_commands
from clients.monitor import HeartbeatMonitor
from clients.output import console
from clients.units import human_size
from messages.commands import InventoryFilter
from messages.common import PowerState, VmSummary
from messages.errors import ErrorCode
from messages.events import Heartbeat, ReadyStatus, StatusResponse


def inventory_table(vms: Sequence[VmSummary]) -> Table:
    table = Table(title=f"Inventory ({len(vms)} VMs)")
    for column in ("VM id", "Name", "Guest OS", "FW", "CPU", "Mem MiB", "Disks",
                   "Networks", "Pool", "Cluster", "Power", "Tools", "Migration"):  # fmt: skip
        table.add_column(column, overflow="fold")
    for vm in vms:
        table.add_row(
            vm.vm_id,
            vm.name,
            vm.guest_os.removesuffix(" (64-bit)"),
            vm.firmware.value,
            str(vm.cpus),
            str(vm.memory_mib),
            " + ".join(human_size(disk.capacity_bytes) for disk in vm.disks),
            ", ".join(nic.network for nic in vm.nics),
            vm.resource_pool,
            vm.cluster,
            vm.power_state.value,
            vm.tools_status.value,
            vm.migration_state.value if vm.migration_state is not None else "-",
        )
    return table


def heartbeat_line(beat: Heartbeat) -> str:
    body = beat.body
    colour = "green" if body.status is ReadyStatus.READY else "red"
    details = f" ({'; '.join(body.status_details)})" if body.status_details else ""
    counts = ", ".join(f"{state}={n}" for state, n in sorted(body.migration_counts.items()))
    return (
        f"{beat.sent_at:%H:%M:%S} {body.appliance_id} #{body.sequence} "
        f"[{colour}]{body.status.value}[/{colour}]{details} "
        f"in-flight={body.commands_in_flight}" + (f" migrations: {counts}" if counts else "")
    )


async def cmd_inventory(client: FerryClient, args: argparse.Namespace) -> int:
    filters = InventoryFilter(
        name_glob=args.name,
        cluster=args.cluster,
        power_state=PowerState(args.power) if args.power else None,
    )
    vms = await client.inventory(filters, page_size=args.page_size)
    console.print(inventory_table(vms))
    return 0


def status_table(answer: StatusResponse) -> Table:
    table = Table(title=f"Appliance {answer.appliance_id}: {answer.body.status.value}")
    table.add_column("Key")
    table.add_column("Value")
    for state, count in sorted(answer.body.migration_counts.items()):
        table.add_row(f"migrations {state}", str(count))
    for name, value in answer.body.policy.items():
        table.add_row(f"policy {name}", "-" if value is None else str(value))
    return table


async def cmd_status(client: FerryClient, _args: argparse.Namespace) -> int:
    console.print(status_table(await client.status()))
    return 0


async def cmd_watch(client: FerryClient, args: argparse.Namespace) -> int:
    monitor = HeartbeatMonitor(
        args.interval,
        max_missed=args.missed,
        count=args.count,
        fail_on_not_ready=args.fail_on_not_ready,
    )
    result = await monitor.watch(
        client.heartbeats(), lambda beat: console.print(heartbeat_line(beat))
    )
    if result.exit_code:
        console.print(f"[red]watch: {result.outcome.value} after {result.beats} heartbeats[/red]")
    return result.exit_code


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="ferry", description=__doc__)
    root.add_argument(
        "--runtime", type=Path, help="a local appliance's runtime.json (pins its key too)"
    )
    root.add_argument(
        "--appliance-key",
        help="the appliance's public key to verify its answers with (FERRY_APPLIANCE_KEY; "
        "`ferry-appliance keys show` prints it)",
    )
    commands = root.add_subparsers(dest="command", required=True)
    inventory = commands.add_parser("inventory", help="list the source site's VMs")
    inventory.add_argument("--name", help="name glob, e.g. 'lnx-*'")
    inventory.add_argument("--cluster")
    inventory.add_argument("--power", choices=[state.value for state in PowerState])
    inventory.add_argument("--page-size", type=int, default=100)
    inventory.set_defaults(func=cmd_inventory)
    commands.add_parser("status", help="appliance status").set_defaults(func=cmd_status)
    watch = commands.add_parser("watch", help="follow heartbeats")
    watch.add_argument("--interval", type=float, default=30.0, help="expected heartbeat interval")
    watch.add_argument("--missed", type=int, default=3, help="exit 3 after this many missed")
    watch.add_argument("--count", type=int, help="exit 0 after this many heartbeats")
    watch.add_argument("--fail-on-not-ready", action="store_true", help="exit 4 on Not Ready")
    watch.set_defaults(func=cmd_watch)
    add_commands(commands)
    cloud.add_commands(commands)
    health.add_commands(commands)
    reset.add_commands(commands)
    return root


async def _main(args: argparse.Namespace) -> int:
    settings = ClientSettings.load(args.runtime, appliance_key=args.appliance_key)
    # Following heartbeats sends no command: no private reply queue to make and remove.
    private = args.func is not cmd_watch
    async with FerryClient(settings, private_queue=private) as client:
        code: int = await args.func(client, args)
        return code


def refusal(error: FerryError) -> str:
    """The appliance's ErrorResponse, said plainly: what it refused, its code, its reason."""
    body = error.response.body
    what = body.command_type or "the command"
    if body.code is ErrorCode.NOT_IMPLEMENTED:
        return f"{what} is not implemented by this appliance: {body.message}"
    return f"{what} refused by the appliance ({body.code.value}): {body.message}"


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return asyncio.run(_main(args))
    except FerryError as error:
        console.print(f"[red]ferry: {escape(refusal(error))}[/red]")
        return 1
    except (NoAnswer, ValueError, ValidationError, OSError, RuntimeError) as error:
        console.print(f"[red]ferry: {escape(str(error))}[/red]")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
