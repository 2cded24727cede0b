"""``make demo``: a real end-to-end run on the embedded default, driven through the CLI.

Creates a sample lab site, starts ``ferry-appliance run`` (embedded moto and
redis-server), then uses the ``ferry`` CLI as an operator would, and stops the
appliance with SIGTERM, checking it shuts down cleanly. The bus token is made
up for the run and passed through the environment only: it is never written
to disk. The appliance makes its key pair in the data directory on first start;
the demo reads the public key from runtime.json and pins it on every ``ferry``
call (``--appliance-key``), as an operator would.

The data directory (``--data-dir``, default ``.demo``) must be new, empty, or
one an earlier demo made (it holds ``.ferry-demo``); only the latter is
emptied first. The demo never removes a directory, nor anything it did not make.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.rule import Rule

from appliance.sites.lab.site import LabSite
from messages.common import GuestOsFamily, PowerState, ToolsStatus

console = Console()


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _step(title: str, command: list[str], env: dict[str, str]) -> None:
    console.print(Rule(title))
    console.print(f"$ {' '.join(command[0:1] + command[1:])}", style="dim")
    subprocess.run(command, env=env, check=True)


def _wait_for(path: Path, process: subprocess.Popen[bytes], within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while not path.exists():
        if process.poll() is not None:
            raise RuntimeError(f"the appliance exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the appliance did not start within {within_s:.0f}s")
        time.sleep(0.2)


NETWORK_MAP = (
    ("VM Network", "cloud-default"),
    ("prod-app", "cloud-app"),
    ("prod-db", "cloud-db"),
    ("dmz", "cloud-dmz"),
    ("backup", "cloud-backup"),
)


def _running_linux_vms(data_dir: Path) -> list[str]:
    """Running Linux VMs with guest tools: the first two an app and its database, say."""
    vms = asyncio.run(LabSite.open(data_dir / "sites" / "onprem").list_vms())
    fit = [
        vm.name
        for vm in vms
        if vm.guest_os_family is GuestOsFamily.LINUX
        and vm.tools_status is ToolsStatus.RUNNING
        and vm.power_state is PowerState.ON
    ]
    if len(fit) < 4:
        raise RuntimeError("the sample site has fewer than four running Linux VMs")
    return fit


DEMO_MARKER = ".ferry-demo"
"""Marks a data directory the demo made: only such a directory is emptied by the next run."""


class DataDirRefused(Exception):
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        super().__init__(
            f"{data_dir} is not empty and was not made by the demo (no {DEMO_MARKER} in it): "
            "the demo does not touch it; give a new or empty directory"
        )


def prepare_data_dir(data_dir: Path) -> None:
    """A data directory the demo may fill: new, empty, or one an earlier demo made.

    A directory the demo made earlier (it holds :data:`DEMO_MARKER`) is emptied;
    the directory itself is never removed. Anything else that is not empty is
    refused with :class:`DataDirRefused`, untouched.
    """
    marker = data_dir / DEMO_MARKER
    if data_dir.exists() and not marker.is_file():
        if not data_dir.is_dir() or any(data_dir.iterdir()):
            raise DataDirRefused(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    for entry in data_dir.iterdir():
        if entry.name == DEMO_MARKER:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    marker.write_text("made by 'ferry-appliance demo'; emptied by its next run\n")


def _try_before_commit(
    ferry: list[str], vm: str, mapped: list[str], data_dir: Path, env: dict[str, str]
) -> None:
    """A VM runs in the cloud over the cache while its guest writes; two epochs flush it
    back on-prem; a migrate back brings it home; the check proves nothing was lost."""
    _step("10. an epoch every 10 s by default", [*ferry, "policy", "set", "--rto", "10s"], env)
    tbc = [*ferry, "migrate", vm, "--type", "tbc", "--wait", "--guest-user", "demo", *mapped]
    _step("11. try before commit: the VM runs in the cloud on the cache at once", tbc, env)
    log_path = data_dir / "guest-writes.log"
    guest_cmd = [_bin("ferry-appliance"), "lab", "guest", "--vm", vm, "--log", str(log_path)]
    guest_cmd += ["--seconds", "15"]
    console.print(Rule("12. its guest writes on the cloud cache (15 s)"))
    console.print(f"$ {' '.join(guest_cmd)} &", style="dim")
    guest = subprocess.Popen(guest_cmd, env=env)
    try:
        _step("13a. an epoch now, while the guest writes", [*ferry, "sync", vm], env)
        _step("13b. RPO lag of the VM resting in the cloud", [*ferry, "migrations"], env)
    finally:
        if guest.wait(timeout=120) != 0:
            raise RuntimeError(f"the demo guest exited with {guest.returncode}")
    _step("13c. a second epoch, after the guest's last write", [*ferry, "sync", vm], env)
    _step("14. migrate back", [*ferry, "migrate-back", vm, "--wait"], env)
    check = [_bin("ferry-appliance"), "lab", "check", "--vm", vm, "--log", str(log_path)]
    _step("15. the on-prem disk against the guest's whole write log", check, env)


def run_demo(data_dir: Path) -> int:
    try:
        prepare_data_dir(data_dir)
    except DataDirRefused as refused:
        console.print(f"[red]{refused}[/red]")
        return 2
    env = {
        **os.environ,
        "FERRY_DATA_DIR": str(data_dir),
        "FERRY_BUS_TOKEN": secrets.token_hex(32),
        "FERRY_HEARTBEAT_INTERVAL_S": "2",
        "FERRY_RECEIVE_WAIT_S": "1",
        "FERRY_APPLIANCE_ID": "ferry-demo",
        "FERRY_GUEST_PASSWORD": secrets.token_urlsafe(12),  # the demo guest's login
        # The cloud cache and the on-prem I/O manager, as the appliance's children.
        "FERRY_EMBEDDED_COMPONENTS": "onprem/onprem-1,cache/cache-1",
    }
    _step(
        "1. a sample on-prem lab site",
        [_bin("ferry-appliance"), "lab", "create", "--vms", "12"],
        env,
    )
    console.print(Rule("2. start the appliance (embedded moto + redis-server)"))
    log_path = data_dir / "appliance.log"
    with log_path.open("wb") as log:
        appliance = subprocess.Popen(
            [_bin("ferry-appliance"), "run"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        _wait_for(data_dir / "runtime.json", appliance, within_s=60)
        console.print(f"appliance up (pid {appliance.pid}); log: {log_path}")
        runtime = data_dir / "runtime.json"
        key = json.loads(runtime.read_text())["appliance_key"]
        console.print(f"appliance key (pinned below): {key}")
        ferry = [_bin("ferry"), "--runtime", str(runtime), "--appliance-key", key]
        _step("3. inventory through the command queue", [*ferry, "inventory"], env)
        _step(
            "4. only powered-on Linux VMs",
            [*ferry, "inventory", "--name", "lnx-*", "--power", "poweredOn"],
            env,
        )
        _step("5. heartbeats", [*ferry, "watch", "--count", "2", "--interval", "10"], env)
        linux = _running_linux_vms(data_dir)
        pair, tbc_vm, warm_vm = linux[:2], linux[2], linux[3]
        mapped = [arg for pair_ in NETWORK_MAP for arg in ("--network-map", "=".join(pair_))]
        migrate = [*ferry, "migrate", *pair, "--together", "--wait", "--guest-user", "demo"]
        migrate += ["--bandwidth-mbps", "400"]  # slow enough to watch the progress bars
        _step(
            "6. cold-migrate two dependent VMs (one group: cut over together)",
            migrate + mapped,
            env,
        )
        _step("7. migrations", [*ferry, "migrations"], env)
        _step(
            "8. the on-prem VMs, now in _HDM_MIGRATEPOOL",
            [*ferry, "inventory", "--power", "poweredOff"],
            env,
        )
        _step("9. appliance status", [*ferry, "status"], env)
        _try_before_commit(ferry, tbc_vm, mapped, data_dir, env)
        warm = [*ferry, "migrate", warm_vm, "--type", "warm", "--wait", "--guest-user", "demo"]
        _step(
            "16. warm: runs in the cloud at once, copied meanwhile, reconciled, cut over",
            warm + mapped,
            env,
        )
        _step("17. its cutover time (cloud VM off → on)", [*ferry, "migrations"], env)
        commit = [*ferry, "commit", warm_vm, "--wait"]
        _step("18. commit: the cache disks and hdm_N cleaned up", commit, env)
    finally:
        console.print(Rule("19. stop the appliance (SIGTERM)"))
        appliance.send_signal(signal.SIGTERM)
        try:
            code = appliance.wait(timeout=60)
        except subprocess.TimeoutExpired:
            appliance.kill()
            code = appliance.wait()
    if code != 0:
        console.print(f"[red]appliance exited with {code}; see {log_path}[/red]")
        return 1
    console.print("[green]appliance stopped cleanly; demo done[/green]")
    return 0
