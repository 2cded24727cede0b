"""``make bench``: cold migration end to end over SQS, one 4 GiB VM and eight VMs at once.

The appliance runs as its own process (``python -m appliance.cli run``) on
LocalStack and a redis-server of its own; this process is the client: it
sends one SourceCloneRequest (guest credentials, network map
prod-app=cloud-app) and follows the SourceCloneResponses until every VM has
completed. Lab disks are about half allocated (random, text-like and
all-zero chunks, the rest holes), built before the clock starts.

Figures, one run each:

* wall time: request sent to the last completion received (client side);
* aggregate MB/s: allocated bytes moved (sum of ``bytes_total``) / wall time;
* time outside the transfer: wall time during which no VM was in its
  transfer step, from the appliance's per-migration event log in Redis
  (``{prefix}:events:{migration_id}``), with every step's mean per VM;
* the appliance's peak RSS (VmHWM);
* the result: each cloud volume's content equals its on-prem disk (sha256,
  read after the appliance has stopped).

The table is printed and written to ``.bench/cold.txt``.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest

from appliance.embedded import RedisServer
from appliance.orchestrator.record import load
from appliance.sites.lab.site import LabSite
from appliance.sites.model import VmConfig
from appliance.state.events import EventLog, EventRecord
from appliance.state.keys import Keys
from appliance.state.migrations import MigrationStore
from appliance.state.store import StateStore, connect
from clients.client import FerryClient
from clients.config import ClientSettings
from messages.commands import (
    CloneVm,
    NetworkMapping,
    SourceCloneRequest,
    SourceCloneRequestBody,
)
from messages.common import MigrationState, MigrationType
from messages.events import MigrationStatus, SourceCloneResponse
from tests.integration.conftest import localstack  # noqa: F401  (the session fixture)
from tests.support.lab import MIB, build_lab, cloud_volume, disk_digest, lab_vm, onprem_disk
from tests.support.pagecache import settle

pytestmark = [pytest.mark.bench, pytest.mark.timeout(1800)]
TOKEN = "bench-" + uuid.uuid4().hex
GIB = 1024 * MIB
RESULTS = Path(".bench")
FINAL = {MigrationState.COMPLETED, MigrationState.FAILED, MigrationState.CANCELLED}
STEPS = (
    ("request", "request -> queued (SQS, dispatch)"),
    ("queued", "queued (waiting for admission)"),
    ("preparing", "prepare (checks, guest prep)"),
    ("powering_off", "power off"),
    ("snapshotting", "snapshot"),
    ("transferring", "transfer"),
    ("verifying", "verify"),
    ("creating_target", "create cloud VM"),
    ("powering_on", "power on"),
    ("finalizing", "finalize"),
    ("reported", "completed -> client saw it"),
)


@dataclass
class Outcome:
    label: str
    vms: int
    build_s: float = 0.0
    wall_s: float = 0.0
    allocated: int = 0  # measured at the source: data and all-zero extents, not holes
    bytes_total: int = 0  # what the appliance reports (sum of bytes_total)
    completed: int = 0
    transfer_window_s: float = 0.0  # time at least one VM was transferring
    steps: dict[str, list[float]] = field(default_factory=dict)  # step -> seconds per VM
    peak_rss_mib: float = float("nan")
    volumes_equal: int = 0
    volumes: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def mb_per_s(self) -> float:
        return self.allocated / self.wall_s / 1e6 if self.wall_s else 0.0

    @property
    def transfer_mb_per_s(self) -> float:
        window = self.transfer_window_s
        return self.allocated / window / 1e6 if window else 0.0

    @property
    def outside_s(self) -> float:
        return max(0.0, self.wall_s - self.transfer_window_s)

    def mean(self, step: str) -> float:
        values = self.steps.get(step, [])
        return sum(values) / len(values) if values else 0.0


# --- the appliance process --------------------------------------------------------------


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _start(data_dir: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        process = await asyncio.to_thread(
            subprocess.Popen,
            [sys.executable, "-m", "appliance.cli", "run"],
            env={**os.environ, **env, "FERRY_DATA_DIR": str(data_dir), "FERRY_BUS_TOKEN": TOKEN,
                 "FERRY_LOG_LEVEL": "warning", "FERRY_APPLIANCE_ID": "ferry-bench"},
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 60
    while not (data_dir / "runtime.json").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()  # never leave one running behind a failed bench
            await asyncio.to_thread(process.wait)
            raise AssertionError(f"appliance did not start: {log.read_text()[-3000:]}")
        await asyncio.sleep(0.1)
    return process


async def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, 60)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)


# --- driving a migration ------------------------------------------------------------------


def _request(client: FerryClient, vms: Sequence[VmConfig]) -> SourceCloneRequest:
    return SourceCloneRequest(
        body=SourceCloneRequestBody(
            request_id=f"bench-{uuid.uuid4().hex[:8]}",
            vms=tuple(CloneVm(vm_id=vm.vm_id) for vm in vms),
            migration_type=MigrationType.COLD,
            guest_credentials=client.seal_credentials("bench", "b3nch-pw"),
            network_map=(NetworkMapping(source="prod-app", target="cloud-app"),),
        )
    )


async def _migrate(
    client: FerryClient, request: SourceCloneRequest, within_s: float
) -> tuple[dict[str, MigrationStatus], dict[str, float]]:
    """Send ``request``; follow its answers until every VM is final. Returns the last status of
    each migration and the wall-clock time (time.time) each was seen final."""
    await client.send(request)
    latest: dict[str, MigrationStatus] = {}
    seen_final: dict[str, float] = {}
    async with asyncio.timeout(within_s):
        while len(seen_final) < len(request.body.vms):
            event = await client.next_answer(request.correlation_id, timeout_s=within_s)
            if not isinstance(event, SourceCloneResponse):
                continue
            status = event.body
            previous = latest.get(status.migration_id)
            if previous is None or previous.updated_at <= status.updated_at:
                latest[status.migration_id] = status
            if status.state in FINAL:
                seen_final.setdefault(status.migration_id, time.time())
    return latest, seen_final


async def _history(
    redis_url: str, prefix: str, migration_id: str
) -> tuple[float, list[EventRecord]]:
    """When the migration was created (queued), and its step events, oldest first."""
    store = StateStore(connect(redis_url), Keys(prefix))
    try:
        stored = await MigrationStore(store).get(migration_id)
        events = await EventLog(store).read(migration_id, count=1000)
    finally:
        await store.close()
    assert stored is not None, migration_id
    created = datetime.fromisoformat(load(stored.record).created_at).timestamp()
    return created, [e for e in events if e.kind == "step"]


def _at(event: EventRecord) -> float:
    return datetime.fromisoformat(event.at).timestamp()


def _step_durations(
    created: float, events: list[EventRecord], sent_at: float, seen_at: float
) -> dict[str, float]:
    """Seconds spent in each step (a step's event to the next one's), plus the edges:
    request sent -> created, and completed -> seen by the client."""
    durations = {"request": created - sent_at}
    if events:
        durations["queued"] = _at(events[0]) - created
        durations["reported"] = seen_at - _at(events[-1])
    for this, following in itertools.pairwise(events):
        step = this.fields["step"]
        durations[step] = durations.get(step, 0.0) + _at(following) - _at(this)
    return durations


def _transfer_interval(events: list[EventRecord]) -> tuple[float, float] | None:
    for this, following in itertools.pairwise(events):
        if this.fields["step"] == "transferring":
            return _at(this), _at(following)
    return None


def _union_s(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


async def _analyse(
    outcome: Outcome,
    latest: dict[str, MigrationStatus],
    seen_final: dict[str, float],
    sent_at: float,
    redis_url: str,
    prefix: str,
) -> None:
    outcome.bytes_total = sum(s.bytes_total for s in latest.values())
    outcome.completed = sum(s.state is MigrationState.COMPLETED for s in latest.values())
    outcome.errors = [f"{s.vm_name}: {s.error.code} {s.error.message}" for s in latest.values()
                      if s.error is not None]  # fmt: skip
    transfers = []
    for migration_id in latest:
        created, events = await _history(redis_url, prefix, migration_id)
        durations = _step_durations(created, events, sent_at, seen_final[migration_id])
        for step, seconds in durations.items():
            outcome.steps.setdefault(step, []).append(seconds)
        transfer = _transfer_interval(events)
        if transfer is not None:
            transfers.append(transfer)
    outcome.transfer_window_s = _union_s(transfers)


async def _allocated_bytes(data_dir: Path, vms: Sequence[VmConfig]) -> int:
    site = LabSite.open(data_dir / "sites" / "onprem")
    try:
        total = 0
        for vm in vms:
            for disk in vm.disks:
                source = await site.open_disk(vm.vm_id, disk.disk_id)
                total += sum(e.length for e in await source.extents() if not e.hole)
        return total
    finally:
        await site.close()


async def _check_volumes(
    outcome: Outcome, data_dir: Path, vms: Sequence[VmConfig], latest: dict[str, MigrationStatus]
) -> None:
    by_vm = {s.vm_id: s for s in latest.values()}
    for vm in vms:
        for disk in vm.disks:
            outcome.volumes += 1
            status = by_vm.get(vm.vm_id)
            if status is None or status.state is not MigrationState.COMPLETED:
                continue
            source = await disk_digest(onprem_disk(data_dir, vm.vm_id, disk.disk_id))
            volume = cloud_volume(data_dir, f"{status.migration_id}-{disk.disk_id}")
            if await disk_digest(volume) == source:
                outcome.volumes_equal += 1


async def _scenario(
    label: str, vms: list[VmConfig], root: Path, endpoint: str, redis_url: str
) -> Outcome:
    outcome = Outcome(label, len(vms))
    data_dir = root / "data"
    started = time.perf_counter()
    await asyncio.to_thread(settle)  # free memory for the lab's GiBs and the cloud's
    await build_lab(data_dir, vms, seed=7)
    # The lab's GiBs are written back now, not by the kernel during the migration; they
    # stay in the page cache, as a running VM's disk would be.
    await asyncio.to_thread(os.sync)
    outcome.build_s = time.perf_counter() - started
    outcome.allocated = await _allocated_bytes(data_dir, vms)
    suffix = uuid.uuid4().hex[:8]
    prefix = f"bench-cold-{suffix}"
    env = {
        "FERRY_SQS_ENDPOINT": endpoint,
        "FERRY_REDIS_URL": redis_url,
        "FERRY_REDIS_PREFIX": prefix,
        "FERRY_COMMAND_QUEUE": f"bench-cmd-{suffix}",
        "FERRY_RESPONSE_QUEUE": f"bench-rsp-{suffix}",
        "FERRY_DEAD_LETTER_QUEUE": f"bench-dlq-{suffix}",
    }
    process = await _start(data_dir, env, root / "appliance.log")
    try:
        settings = ClientSettings.load(data_dir / "runtime.json", bus_token=TOKEN)
        async with FerryClient(settings) as client:
            request = _request(client, vms)
            sent_at, started = time.time(), time.perf_counter()
            latest, seen_final = await _migrate(client, request, within_s=1500)
            outcome.wall_s = time.perf_counter() - started
        outcome.peak_rss_mib = _peak_rss_mib(process.pid)
        await _analyse(outcome, latest, seen_final, sent_at, redis_url, prefix)
    finally:
        await _stop(process)
    await _check_volumes(outcome, data_dir, vms, latest)
    print(f"  {label}: {outcome.completed}/{outcome.vms} completed in {outcome.wall_s:.1f} s")
    return outcome


# --- the report -------------------------------------------------------------------------


def _rows(outcomes: list[Outcome]) -> list[tuple[str, list[str]]]:
    rows: list[tuple[str, list[str]]] = [
        ("VMs completed", [f"{o.completed}/{o.vms}" for o in outcomes]),
        ("allocated data moved (MiB)", [f"{o.allocated / MIB:,.0f}" for o in outcomes]),
        ("  bytes_total the appliance reports (MiB)", [
            f"{o.bytes_total / MIB:,.0f}" for o in outcomes]),
        ("wall time, request to last completed (s)", [f"{o.wall_s:.1f}" for o in outcomes]),
        ("aggregate MB/s (allocated / wall time)", [f"{o.mb_per_s:.0f}" for o in outcomes]),
        ("MB/s while transferring (alloc. / window)", [
            f"{o.transfer_mb_per_s:.0f}" for o in outcomes]),
        ("transfer window: any VM transferring (s)", [
            f"{o.transfer_window_s:.1f}" for o in outcomes]),
        ("time outside the transfer (s)", [f"{o.outside_s:.1f}" for o in outcomes]),
        ("share of wall time outside the transfer", [
            f"{o.outside_s / o.wall_s:.1%}" if o.wall_s else "-" for o in outcomes]),
        ("appliance peak RSS (MiB)", [f"{o.peak_rss_mib:.0f}" for o in outcomes]),
        ("cloud volumes equal to on-prem disks", [
            f"{o.volumes_equal}/{o.volumes}" for o in outcomes]),
        ("(lab build before the clock, s)", [f"{o.build_s:.1f}" for o in outcomes]),
        ("per step, mean per VM (s):", ["" for _ in outcomes]),
    ]  # fmt: skip
    for step, label in STEPS:
        rows.append((f"  {label}", [f"{o.mean(step):.2f}" for o in outcomes]))
    return rows


def _report(outcomes: list[Outcome]) -> str:
    width = 44
    lines = [
        "Ferry cold migration over SQS: LocalStack 4.9 + redis-server, the appliance in its",
        f"own process; {os.cpu_count()} cores, default concurrency 8, chunk 1 MiB; one run;",
        "MB = 10^6 bytes; allocated = data and all-zero chunks (holes are not moved).",
        f"{'':{width}}" + "".join(f"{o.label:>20}" for o in outcomes),
    ]
    for label, values in _rows(outcomes):
        lines.append(f"{label:{width}}" + "".join(f"{v:>20}" for v in values))
    lines.append("Steps of concurrent VMs overlap: the per-step means do not add up to the wall")
    lines.append("time. 'Outside the transfer' is wall time during which no VM was transferring.")
    for outcome in outcomes:
        lines.extend(f"error ({outcome.label}): {e}" for e in outcome.errors)
    return "\n".join(lines)


SCENARIOS = {
    "one-big-vm": ("1 VM x 4 GiB", lambda: [lab_vm(1, disks=1, disk_size=4 * GIB)]),
    "eight-at-once": (
        "8 VMs x 512 MiB",
        lambda: [lab_vm(n, disks=1, disk_size=512 * MIB) for n in range(1, 9)],
    ),
}
_outcomes: dict[str, Outcome] = {}  # this session's, in SCENARIOS order for the report


@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_cold_migration(
    scenario: str,
    localstack: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    """One scenario per case, so one can run alone (``-k eight``); the report has every
    scenario run so far in this session."""
    label, vms = SCENARIOS[scenario]
    async with RedisServer(tmp_path / "redis") as redis:
        print()
        outcome = await _scenario(label, vms(), tmp_path, localstack, redis.url)
    _outcomes[scenario] = outcome
    report = _report([_outcomes[name] for name in SCENARIOS if name in _outcomes])
    print("\n" + report)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cold.txt").write_text(report + "\n")
    assert outcome.completed == outcome.vms, outcome.errors
    assert outcome.volumes_equal == outcome.volumes
