"""``ferry-appliance``: run the service, show its public key, build a lab site, or show a demo."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import ValidationError

from appliance import logs
from appliance.errors import FerryError, NotConfigured
from appliance.keys import key_path, load_or_create
from appliance.settings import Settings

if TYPE_CHECKING:
    from appliance.components.runtimes import ComponentConfig

log = logs.get_logger("appliance")

_T = TypeVar("_T")


def run_async(main: Coroutine[Any, Any, _T]) -> _T:
    """``asyncio.run(main)``, on uvloop when it is installed, plain asyncio otherwise.

    uvloop's sockets, futures and thread hand-offs are cheaper: an NBD server whose
    requests each take a task and a thread serves about a third more of them."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {}
    if getattr(args, "data_dir", None) is not None:
        overrides["data_dir"] = args.data_dir
    return Settings(**overrides)


async def _run(settings: Settings) -> None:
    from appliance.service.app import Appliance

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await Appliance(settings).run(stop)


def cmd_run(args: argparse.Namespace) -> int:
    from appliance.service.app import bus_token

    settings = _settings(args)
    try:
        bus_token(settings)
    except NotConfigured as error:
        print(f"ferry-appliance: {error}", file=sys.stderr)
        return 2
    run_async(_run(settings))
    return 0


def cmd_keys_show(args: argparse.Namespace) -> int:
    """Print the public key clients pin (making the key pair if this data dir has none yet)."""
    settings = _settings(args)
    keys = load_or_create(settings.data_dir)
    if args.json:
        print(
            json.dumps(
                {
                    "appliance_key": keys.public.text,
                    "ed25519": keys.public.signing.hex(),
                    "x25519": keys.public.sealing.hex(),
                    "key_file": str(key_path(settings.data_dir)),
                }
            )
        )
    else:
        print(keys.public.text)
    return 0


def cmd_lab_create(args: argparse.Namespace) -> int:
    from appliance.sites.lab.create import create_lab
    from appliance.sites.lab.sample import MIB, SampleSpec

    settings = _settings(args)
    spec = SampleSpec(vms=args.vms, seed=args.seed, disk_size=args.disk_size_mib * MIB)
    summary = run_async(create_lab(settings.data_dir, spec, fill=not args.empty_disks))
    print(summary)
    return 0


def cmd_lab_guest(args: argparse.Namespace) -> int:
    from appliance.lab_guest import run_guest

    settings = _settings(args)
    run = run_async(
        run_guest(
            settings.data_dir, args.vm, args.log, seconds=args.seconds, seed=args.seed,
            disk_id=args.disk,
        )
    )  # fmt: skip
    print(
        f"guest on {run.export}: {run.writes} writes ({run.bytes_written} bytes), "
        f"{run.flushes} flushes; write log {args.log}"
    )
    return 0


def cmd_lab_check(args: argparse.Namespace) -> int:
    from appliance.lab_guest import check_onprem

    settings = _settings(args)
    check = run_async(check_onprem(settings.data_dir, args.vm, args.log, args.disk))
    if check.mismatches:
        print(
            f"on-prem {args.vm}/{args.disk} DIFFERS from the guest's write log: "
            f"{check.mismatches} ranges, first at byte {check.first_offset}"
        )
        return 1
    print(
        f"on-prem {args.vm}/{args.disk} holds all {check.writes} writes of the guest's log "
        "(the last one for every byte it wrote): nothing lost"
    )
    return 0


def _component_config(args: argparse.Namespace, settings: Settings) -> ComponentConfig:
    from appliance.components.orders import ComponentId
    from appliance.components.runtimes import ComponentConfig

    if settings.redis_url is None:
        raise NotConfigured("FERRY_REDIS_URL", "a component needs the control plane's Redis")
    bind = args.nbd_bind or settings.component_nbd_bind
    host, _, port = bind.rpartition(":")
    if not port.isdigit() or int(port) > 65535:
        raise NotConfigured("--nbd-bind", f"expected HOST:PORT, got {bind!r}")
    try:
        instance = ComponentId(args.kind, args.name)
    except ValueError as error:
        raise NotConfigured("--name", str(error)) from None
    data_dir = args.component_data_dir or settings.data_dir / "components" / args.kind / args.name
    return ComponentConfig(
        instance=instance,
        data_dir=data_dir.resolve(),
        nbd_host=host or "127.0.0.1",
        nbd_port=int(port),
        redis_url=settings.redis_url.get_secret_value(),
        redis_prefix=settings.redis_prefix,
        heartbeat_interval_s=settings.component_heartbeat_interval_s,
        heartbeat_ttl_s=settings.component_timeout_s * 3,
        reconcile_interval_s=settings.component_reconcile_interval_s,
        settings=settings,
    )


def cmd_component(args: argparse.Namespace) -> int:
    """Run one component (cloud cache or on-prem I/O manager) until SIGTERM/SIGINT."""
    from appliance.components.process import run_component
    from appliance.components.runtimes import runtime_by_name, runtime_for_kind

    settings = _settings(args)
    config = _component_config(args, settings)
    named = args.runtime or settings.component_runtime
    if named:
        factory = runtime_by_name(named, test_mode=settings.test_mode)
    else:
        factory = runtime_for_kind(args.kind)
    logs.register_secret(config.redis_url)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await run_component(config, factory, stop)

    run_async(run())
    return 0


def cmd_package_verify(args: argparse.Namespace) -> int:
    """Fetch and hash every chunk of a package; exit 1 naming every defect."""
    from appliance.datapath.package.command import verify_command

    return verify_command(_settings(args), args.location, args.manifest_sha256, args.json)


def cmd_demo(args: argparse.Namespace) -> int:
    from appliance.demo import run_demo

    return run_demo(args.data_dir or Path(".demo"))


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="ferry-appliance", description=__doc__)
    root.add_argument("--data-dir", type=Path, default=None, help="overrides FERRY_DATA_DIR")
    commands = root.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="run the appliance").set_defaults(func=cmd_run)
    keys = commands.add_parser("keys", help="the appliance's key pair").add_subparsers(
        dest="keys", required=True
    )
    show = keys.add_parser("show", help="print the public key clients pin (FERRY_APPLIANCE_KEY)")
    show.add_argument("--json", action="store_true", help="both halves and the key file, as JSON")
    show.set_defaults(func=cmd_keys_show)
    lab = commands.add_parser("lab", help="the lab site").add_subparsers(dest="lab", required=True)
    create = lab.add_parser("create", help="create a sample on-prem site and an empty cloud site")
    create.add_argument("--vms", type=int, default=12)
    create.add_argument("--seed", type=int, default=7)
    create.add_argument("--disk-size-mib", type=int, default=64, help="boot disk size")
    create.add_argument("--empty-disks", action="store_true", help="leave disks unwritten")
    create.set_defaults(func=cmd_lab_create)
    guest = lab.add_parser("guest", help="write to a cloud VM's disk like a guest, with a log")
    guest.add_argument("--vm", required=True, help="the cloud VM's name")
    guest.add_argument("--disk", default="disk-0")
    guest.add_argument("--log", type=Path, required=True, help="the write log to keep")
    guest.add_argument("--seconds", type=float, default=20.0)
    guest.add_argument("--seed", type=int, default=1)
    guest.set_defaults(func=cmd_lab_guest)
    check = lab.add_parser("check", help="does the on-prem disk hold every write of a log")
    check.add_argument("--vm", required=True, help="the on-prem VM's name")
    check.add_argument("--disk", default="disk-0")
    check.add_argument("--log", type=Path, required=True)
    check.set_defaults(func=cmd_lab_check)
    component = commands.add_parser(
        "component", help="run a data-plane component (see appliance/components/README.md)"
    )
    component.add_argument(
        "kind", choices=["cache", "onprem"], help="cloud cache or on-prem I/O manager"
    )
    component.add_argument("--name", required=True, help="unique per kind, e.g. cache-1")
    component.add_argument(
        "--data-dir", dest="component_data_dir", type=Path, default=None, metavar="DIR",
        help="the component's own data directory (default: FERRY_DATA_DIR/components/KIND/NAME)",
    )  # fmt: skip
    component.add_argument(
        "--nbd-bind", default=None, help="HOST:PORT for its NBD server (FERRY_COMPONENT_NBD_BIND)"
    )
    component.add_argument(
        "--runtime", default=None, help="module:Class; tests only (needs FERRY_TEST_MODE=1)"
    )
    component.set_defaults(func=cmd_component)
    package = commands.add_parser("package", help="offline bulk packages").add_subparsers(
        dest="package", required=True
    )
    verify = package.add_parser("verify", help="check every chunk of a package by its manifest")
    verify.add_argument("location", help="a directory or s3://bucket/prefix")
    verify.add_argument(
        "--manifest-sha256", default=None, help="refuse a manifest with another SHA-256"
    )
    verify.add_argument("--json", action="store_true", help="the report as JSON")
    verify.set_defaults(func=cmd_package_verify)
    demo = commands.add_parser("demo", help="run an end-to-end demo on the embedded default")
    demo.set_defaults(func=cmd_demo)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as error:
        print(f"ferry-appliance: bad FERRY_* setting: {error}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    try:
        code: int = args.func(args)
    except FerryError as error:
        print(f"ferry-appliance: {error}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
