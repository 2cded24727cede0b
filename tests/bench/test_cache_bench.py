"""``make bench``: the cloud cache and the on-prem I/O manager beside qemu-nbd, one run, ratios.

Both components run as real processes (``ferry-appliance component onprem|cache``
under the appliance's :class:`Supervisor`, ordered through Redis). On-prem
serves a lab disk of random data (``cur/src``) and an empty one (``cur/epoch``).
Everything between the cloud side and on-prem crosses one shaped link
(:mod:`tests.support.shaper`, its own process: 1 Gbit/s each way, 5 ms RTT):
the cache's upstream (misses and epoch shipping), the backing file of
qemu-nbd's qcow2 overlays, and the data path's full copy; the RTT it adds to a
small request is measured and printed. One table:

1. Cache hits: fio (its ``nbd`` engine, one connection) 4 KiB random read
   QD16, 4 KiB random write QD16 and 1 MiB sequential read QD16 against the
   cache's export of ``src``, beside ``qemu-nbd`` serving a qcow2 overlay
   whose backing file is the same on-prem export, behind qemu's
   ``copy-on-read`` filter (its nearest peer of a read-through cache), and
   plain ``qemu-nbd`` on a raw file of the same bytes (the ceiling). All
   warmed by one untimed sequential pass (the cache then holds every chunk,
   the overlay every cluster; the cache's bytes are checked against the raw
   file); qemu-nbd with ``--cache=writeback --aio=threads``, as the cache
   keeps its slots in the page cache and syncs on FLUSH. Best of
   ``FERRY_BENCH_ROUNDS`` interleaved rounds. Beside the rates, each server's
   CPU time per request (user + system, all threads, from /proc): on a
   shared machine the rates follow the neighbours' load, this barely does.
2. Misses: one cold pass of fio 1 MiB sequential read QD16 over the whole
   disk through the link: a disk freshly opened on the cache (upstream
   ``cur/src``) beside a fresh overlay. Best of the rounds.
3. Epochs: fio writes the whole ``epoch`` disk (1 MiB writes QD16, random
   bytes, then a FLUSH) through the cache export; an epoch is cut (an order);
   time from the cut to on-prem's reply to the commit (Redis stream ids:
   Redis's clock at both ends), the on-prem image then checked equal to the
   cache's. Beside it, the data path's full copy of a disk of the same size
   (the ``Transfer`` engine, its default options, in a process of its own)
   from a local raw file to Ferry's NBD server exporting a fresh raw file,
   through the same link. The epoch's time is split at on-prem's reply to
   the stage request and the cache's commit request (transfer and manifest,
   then on-prem's commit: verify, then link the staged epoch as a layer of the disk).
4. Peak RSS (VmHWM) of each component process under the fio load of 1 and 2
   (reset through ``clear_refs`` after the epoch phase), and over the whole run.

Tools (fio, qemu-nbd, lab disks, the full-copy process) are in ``cache_tools.py``.
Run it alone: ``.venv/bin/python -m pytest -p no:cacheprovider
tests/bench/test_cache_bench.py -m bench -s``. The table is printed and
written to ``.bench/cache.txt``. Environment: ``FERRY_BENCH_SCALE`` (disk
size as a fraction of 1 GiB; default 1), ``FERRY_BENCH_RUNTIME_S`` (default
6), ``FERRY_BENCH_ROUNDS`` (default 2).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from appliance.components.orders import Order, OrderAction, ParamValue
from appliance.datapath.nbd.channel import TcpAddress
from appliance.embedded import RedisServer
from appliance.state.keys import Keys
from appliance.state.leases import Lease
from tests.bench.cache_tools import (
    Figure,
    Workload,
    cpu_seconds,
    digest,
    file_digest,
    fio,
    make_empty,
    make_source,
    nbd_runner,
    overlay,
    peak_rss_mb,
    qemu_nbd,
    reset_peak_rss,
    text,
)
from tests.support.components import (
    CACHE,
    ONPREM,
    ComponentPair,
    applied,
    component_pair,
    take_lease,
)
from tests.support.shaper import ShaperProcess, shaper_process

pytestmark = [pytest.mark.bench, pytest.mark.timeout(3600)]

ROOT = Path(__file__).resolve().parents[2]
MIB = 1 << 20
GIB = 1 << 30
SCALE = float(os.environ.get("FERRY_BENCH_SCALE", "1"))
DISK = max(16 * MIB, int(GIB * SCALE) // MIB * MIB)
RUNTIME_S = int(os.environ.get("FERRY_BENCH_RUNTIME_S", "6"))
ROUNDS = int(os.environ.get("FERRY_BENCH_ROUNDS", "2"))
RATE_BITS = 1e9
RTT_MS = 5.0
MIGRATION = "m-1"
COMMIT_WAIT_S = 1800.0
RSS_TARGET_MB = 260


def verdict(met: bool) -> str:
    return "  yes" if met else "  NO"


HITS = (
    Workload("4 KiB random read QD16", "randread", "4k"),
    Workload("4 KiB random write QD16", "randwrite", "4k"),
    Workload("1 MiB sequential read QD16", "read", "1m"),
)
PASS = Workload("1 MiB sequential read QD16, one cold pass", "read", "1m")
PING = Workload("4 KiB random read QD1", "randread", "4k", iodepth=1)
FILL = Workload("1 MiB sequential write QD16", "write", "1m")


@dataclass
class Figures:
    """The best figure of each workload over the rounds, per server."""

    best: dict[tuple[str, str], Figure] = field(default_factory=dict)

    cpu_us: dict[tuple[str, str], float] = field(default_factory=dict)
    """The server's CPU time per request (least over the rounds)."""

    def keep(self, server: str, workload: str, figure: Figure) -> None:
        old = self.best.get((server, workload))
        if old is None or figure.mb_s > old.mb_s:
            self.best[(server, workload)] = figure

    def keep_cpu(self, server: str, workload: str, cpu_us: float) -> None:
        old = self.cpu_us.get((server, workload))
        self.cpu_us[(server, workload)] = cpu_us if old is None else min(old, cpu_us)

    def __getitem__(self, key: tuple[str, str]) -> Figure:
        return self.best[key]


@dataclass
class Lab:
    pair: ComponentPair
    keys: Keys
    lease: Lease
    link: ShaperProcess
    work: Path
    raw: Path
    onprem: TcpAddress
    target_port: int
    """Ferry's NBD server exporting a fresh raw file: the full copy's target."""

    @property
    def upstream(self) -> str:
        return f"127.0.0.1:{self.link.ports[0]}"

    def backing_url(self, disk_id: str) -> str:
        return f"nbd://{self.upstream}/cur/{disk_id}"

    async def open_onprem(self, disk_id: str, disk_dir: Path, snapshot_id: str) -> None:
        params: dict[str, ParamValue] = {"disk_dir": str(disk_dir), "snapshot_id": snapshot_id}
        order = Order(
            disk_id,
            OrderAction.OPEN,
            MIGRATION,
            self.lease.token,
            self.lease.resource,
            params=params,
        )
        await applied(self.pair.orders(ONPREM), order)

    async def open_cache(self, disk_id: str, source: str) -> str:
        """Open ``disk_id`` on the cache, reading ``cur/<source>`` through the link; its URL."""
        params: dict[str, ParamValue] = {
            "size": DISK,
            "upstream": self.upstream,
            "onprem": ONPREM.name,
            "upstream_export": f"cur/{source}",
            "working_set": 2 * DISK,  # the whole disk, and an epoch of all of it, fit
        }
        order = Order(
            disk_id,
            OrderAction.OPEN,
            MIGRATION,
            self.lease.token,
            self.lease.resource,
            params=params,
        )
        outcome = await applied(self.pair.orders(CACHE), order)
        return f"nbd://{outcome.result['address']}/{outcome.result['export']}"

    async def pids(self) -> dict[str, int]:
        found = {}
        for instance in (CACHE, ONPREM):
            report = await self.pair.wait(instance, lambda r: r.pid is not None)
            assert report.pid is not None
            found[instance.kind] = report.pid
        return found


def address_of(url: str) -> TcpAddress:
    """The server of an ``nbd://HOST:PORT/EXPORT`` URL."""
    host, port = url.removeprefix("nbd://").split("/")[0].rsplit(":", 1)
    return TcpAddress(host, int(port))


async def link_check(lab: Lab) -> str:
    """What the link adds to a small request, as measured: its RTT in practice."""
    direct = await fio(f"nbd://{lab.onprem}/cur/src", PING, runtime_s=2)
    through = await fio(lab.backing_url("src"), PING, runtime_s=2)
    return (
        f"4 KiB reads QD1 of on-prem's cur/src take {through.latency_ms:.2f} ms through the "
        f"link, {direct.latency_ms:.2f} ms direct: {through.latency_ms - direct.latency_ms:.2f} "
        f"ms added ({RTT_MS:g} ms asked)"
    )


# -- 3. epochs, and the data path's full copy ------------------------------------------------------


async def redis_ms(lab: Lab) -> int:
    seconds, micros = await lab.pair.store.run(lambda r: r.time())
    return int(seconds) * 1000 + int(micros) // 1000


@dataclass(frozen=True, slots=True)
class Milestones:
    """Redis's times (ms) of one epoch's requests and replies: their stream entry ids."""

    staged: int
    """On-prem's first reply to a stage request: the transfer starts."""
    commit_sent: int
    """The cache's commit request that succeeded: transfer and manifest done."""
    committed: int
    """On-prem's reply to it: the epoch is committed and applied."""


async def epoch_milestones(lab: Lab, disk_id: str, epoch: int, since_ms: int) -> Milestones:
    """Follow the epoch's requests and replies on their streams until its commit succeeds."""
    requests = f"{lab.keys.prefix}:epoch-requests:{ONPREM}"
    replies = f"{lab.keys.prefix}:epoch-replies:{ONPREM}"
    positions = {requests: f"{since_ms}-0", replies: f"{since_ms}-0"}
    sent: dict[str, tuple[str, int]] = {}  # request id: (verb, when)
    staged = 0
    deadline = time.monotonic() + COMMIT_WAIT_S
    while time.monotonic() < deadline:

        async def read(r: Any) -> Any:
            return await r.xread(dict(positions), block=2000)

        answer: Any = await lab.pair.store.run(read)
        for stream, entries in answer or []:
            name = text(stream)
            for entry_id, fields in entries:
                positions[name] = text(entry_id)
                at = int(text(entry_id).split("-")[0])
                if name == requests:
                    request = json.loads(fields[b"request"])
                    if (request["disk_id"], request["epoch"]) == (disk_id, epoch):
                        sent[request["request_id"]] = (request["verb"], at)
                    continue
                verb, when = sent.get(text(fields[b"request_id"]), ("", 0))
                if not verb or json.loads(fields[b"reply"])["code"] != "":
                    continue
                if verb == "stage":
                    staged = staged or at
                elif verb == "commit":
                    return Milestones(staged or when, when, at)
    raise AssertionError(f"epoch {epoch} of {disk_id} was not committed in {COMMIT_WAIT_S} s")


@dataclass(frozen=True, slots=True)
class EpochRun:
    write: Figure
    cut_to_commit_s: float
    mb_s: float
    cut_to_staged_s: float
    shipping_s: float
    """From on-prem's staging reply to the commit request: transfer and manifest."""
    onprem_commit_s: float


async def epoch_phase(lab: Lab, disk_id: str) -> EpochRun:
    """The guest writes the whole disk through the cache, flushes; an epoch is cut and timed."""
    url = await lab.open_cache(disk_id, disk_id)
    written = await fio(url, FILL, runtime_s=None, extra=("--refill_buffers", "--end_fsync=1"))
    started = await redis_ms(lab)
    cut = Order(disk_id, OrderAction.CUT_EPOCH, MIGRATION, lab.lease.token, lab.lease.resource, 1)
    epoch = (await applied(lab.pair.orders(CACHE), cut)).result["epoch"]
    assert epoch == 1, f"an epoch was cut before the order: {epoch}"
    times = await epoch_milestones(lab, disk_id, 1, started)

    def shows_committed(report: Any) -> bool:
        return report.figures.get("committed_epoch", {}).get(disk_id, 0) >= 1

    await lab.pair.wait(ONPREM, shows_committed)
    in_cache = await digest(address_of(url), disk_id)
    assert await digest(lab.onprem, f"cur/{disk_id}") == in_cache, "on-prem differs from the cache"
    seconds = (times.committed - started) / 1000
    return EpochRun(
        written,
        seconds,
        DISK / seconds / 1e6,
        (times.staged - started) / 1000,
        (times.commit_sent - times.staged) / 1000,
        (times.committed - times.commit_sent) / 1000,
    )


@dataclass(frozen=True, slots=True)
class CopyRun:
    elapsed_s: float
    mb_s: float
    rss_mb: float
    digests_match: bool


async def full_copy(lab: Lab) -> CopyRun:
    """The data path's full copy of the raw disk, through the link, in a process of its own."""
    command = [sys.executable, "-m", "tests.bench.cache_tools", "copy"]
    command += [str(lab.raw), str(lab.link.ports[1])]
    result = await asyncio.to_thread(
        subprocess.run, command, cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    report = json.loads(line.removeprefix("RESULT "))
    elapsed = float(report["elapsed_s"])
    return CopyRun(elapsed, DISK / elapsed / 1e6, float(report["rss_mb"]), report["digests_match"])


# -- 1. hits, 2. misses --------------------------------------------------------------------------

FERRY = "Ferry cache"
COR = "qemu-nbd qcow2 copy-on-read"
RAW = "qemu-nbd raw (ceiling)"


async def timed_run(figures: Figures, name: str, url: str, pid: int, workload: Workload) -> None:
    """One timed fio run, and the server's CPU time per request over it.

    The CPU time covers fio's ramp second too, so requests are counted at the
    measured rate over ramp and run alike: an estimate, but one the neighbours'
    load barely moves, unlike the rates."""
    before = cpu_seconds(pid)
    figure = await fio(url, workload, runtime_s=RUNTIME_S)
    spent = cpu_seconds(pid) - before
    figures.keep(name, workload.name, figure)
    figures.keep_cpu(name, workload.name, spent / (figure.iops * (RUNTIME_S + 1)) * 1e6)


async def hits_phase(lab: Lab, figures: Figures, commands: dict[str, str], cache_pid: int) -> float:
    """Warm each server, then the rounds; qemu-nbd copy-on-read's peak RSS."""
    held_before = await cached_bytes(lab)
    ferry = await lab.open_cache("src-hits", "src")
    await fio(ferry, PASS, runtime_s=None)  # warm: every chunk fetched and kept
    await lab.pair.wait(CACHE, lambda r: r.figures.get("cache_bytes", 0) >= held_before + DISK)
    cached = await digest(address_of(ferry), "src-hits")
    assert cached == await asyncio.to_thread(file_digest, lab.raw), "the cache differs"
    cor_args = await asyncio.to_thread(overlay, lab.work / "hits.qcow2", lab.backing_url("src"))
    async with (
        qemu_nbd(COR, cor_args, lab.work) as cor,
        qemu_nbd(RAW, ["-f", "raw", str(lab.raw)], lab.work) as raw,
    ):
        commands[COR], commands[RAW] = cor.command, raw.command
        await fio(cor.url, PASS, runtime_s=None)  # warm: every cluster copied into the overlay
        await fio(raw.url, PASS, runtime_s=None)  # the page cache
        os.sync()  # the warm-ups' writes are not written back under the timed runs
        servers = {FERRY: (ferry, cache_pid), COR: (cor.url, cor.pid), RAW: (raw.url, raw.pid)}
        for _ in range(ROUNDS):
            for workload in HITS:
                for name, (url, pid) in servers.items():
                    await timed_run(figures, name, url, pid, workload)
        return peak_rss_mb(cor.pid)


async def cached_bytes(lab: Lab) -> int:
    figure = (await lab.pair.figures(CACHE))["cache_bytes"]
    assert isinstance(figure, int)
    return figure


async def misses_phase(lab: Lab, figures: Figures) -> None:
    for round_ in range(ROUNDS):
        ferry = await lab.open_cache(f"src-cold-{round_}", "src")
        figures.keep(FERRY, PASS.name, await fio(ferry, PASS, runtime_s=None))
        cor_args = await asyncio.to_thread(
            overlay, lab.work / f"cold-{round_}.qcow2", lab.backing_url("src")
        )
        async with qemu_nbd(COR, cor_args, lab.work) as cor:
            figures.keep(COR, PASS.name, await fio(cor.url, PASS, runtime_s=None))


# -- the table -----------------------------------------------------------------------------------


@dataclass
class Report:
    figures: Figures = field(default_factory=Figures)
    commands: dict[str, str] = field(default_factory=dict)
    epoch: EpochRun | None = None
    copy: CopyRun | None = None
    rss_fio: dict[str, float] = field(default_factory=dict)
    rss_epoch: dict[str, float] = field(default_factory=dict)
    rss_qemu_cor: float = 0.0
    link: str = ""
    rtt: str = ""

    def text(self) -> str:
        f = self.figures
        lines = [
            f"Cloud cache bench: {DISK / MIB:.0f} MiB disks of random data, components as "
            f"processes, link {RATE_BITS / 1e9:g} Gbit/s {RTT_MS:g} ms RTT "
            f"(tests/support/shaper.py), fio nbd engine (one connection), {RUNTIME_S} s per "
            f"timed run, best of {ROUNDS} round(s), {os.cpu_count()} cores",
            "",
            f"{'case':46}{'Ferry':>16}{'qemu-nbd COR':>16}{'raw ceiling':>16}{'ratio':>9}"
            f"{'target':>9}  met",
        ]
        for workload in HITS:
            ferry, cor, raw = (f[(s, workload.name)] for s in (FERRY, COR, RAW))
            unit, pick = ("IOPS", "iops") if workload.block == "4k" else ("MB/s", "mb_s")
            values = [getattr(x, pick) for x in (ferry, cor, raw)]
            cells = "".join(f"{v:>11,.0f} {unit}" for v in values)
            lines.append(
                f"{'hit: ' + workload.name:46}{cells}{values[0] / values[1]:8.2f}x{'>= 1.0x':>9}"
                f"{verdict(values[0] / values[1] >= 1.0)}"
            )
        ferry, cor = f[(FERRY, PASS.name)], f[(COR, PASS.name)]
        lines.append(
            f"{'miss: ' + PASS.name:46}{ferry.mb_s:>11,.1f} MB/s{cor.mb_s:>11,.1f} MB/s"
            f"{'':16}{ferry.mb_s / cor.mb_s:8.2f}x{'>= 0.9x':>9}"
            f"{verdict(ferry.mb_s / cor.mb_s >= 0.9)}"
        )
        if self.epoch is not None and self.copy is not None:
            lines.append(
                f"{'epoch of the whole disk, cut to commit':46}{self.epoch.mb_s:>11,.1f} MB/s"
                f"{'':32}{self.epoch.mb_s / self.copy.mb_s:8.2f}x{'>= 0.9x':>9}"
                f"{verdict(self.epoch.mb_s / self.copy.mb_s >= 0.9)}"
            )
            lines.append(f"{'  vs data path full copy (Transfer)':46}{self.copy.mb_s:>11,.1f} MB/s")
            transfer = self.epoch.cut_to_staged_s + self.epoch.shipping_s
            lines.append(
                f"{'  split: transfer, on-prem commit':46}{transfer:>13.2f} s"
                f"{self.epoch.onprem_commit_s:>14.2f} s  (full copy {self.copy.elapsed_s:.2f} s)"
            )
        lines += ["", f"{'server CPU per request (user+system)':46}"]
        for workload in HITS:
            used = [f.cpu_us[(name, workload.name)] for name in (FERRY, COR, RAW)]
            cells = "".join(f"{us:>13.1f} us" for us in used)
            lines.append(
                f"{'hit: ' + workload.name:46}{cells}{used[1] / used[0]:8.2f}x"
                "  (qemu-nbd COR's / Ferry's)"
            )
        lines += [
            "",
            f"{'peak RSS (VmHWM)':46}{'fio phases':>16}{'whole run':>16}{'target':>9}  met",
        ]
        for kind, mb in self.rss_fio.items():
            whole = max(mb, self.rss_epoch.get(kind, 0.0))
            lines.append(
                f"{'ferry ' + kind + ' component':46}{mb:>13.1f} MB{whole:>13.1f} MB"
                f"{'< 260 MB':>9}{verdict(whole < RSS_TARGET_MB)}"
            )
        lines.append(f"{'qemu-nbd copy-on-read (hits)':46}{self.rss_qemu_cor:>13.1f} MB")
        if self.copy is not None:
            lines.append(f"{'data path full copy process':46}{'':16}{self.copy.rss_mb:>13.1f} MB")
        lines += ["", "Details:"]
        if self.epoch is not None and self.copy is not None:
            lines.append(
                f"  epoch: guest wrote {DISK / MIB:.0f} MiB through the cache at "
                f"{self.epoch.write.mb_s:,.1f} MB/s (then FLUSH); cut to on-prem commit "
                f"{self.epoch.cut_to_commit_s:.2f} s: cut to staged "
                f"{self.epoch.cut_to_staged_s:.2f} s, transfer and manifest "
                f"{self.epoch.shipping_s:.2f} s, on-prem commit (verify, link) "
                f"{self.epoch.onprem_commit_s:.2f} s; on-prem cur/ equals the cache's bytes"
            )
            lines.append(
                f"  full copy: {self.copy.elapsed_s:.2f} s, digests match: "
                f"{self.copy.digests_match}"
            )
        lines.append(f"  link: {self.link}; {self.rtt}")
        lines += [f"  {name}: {command}" for name, command in self.commands.items()]
        return "\n".join(lines) + "\n"


# -- the bench -----------------------------------------------------------------------------------


COMPONENT_ENV = {
    "FERRY_CACHE_SCALE": "1",
    "FERRY_COMPONENT_HEARTBEAT_INTERVAL_S": "0.5",
    "FERRY_COMPONENT_EPOCH_TIMEOUT_S": "900",  # on-prem verifying and applying a whole disk
    "FERRY_CACHE_UPSTREAM_TIMEOUT_S": "300",
    "FERRY_CACHE_RETRY_DELAY_S": "0.5",
}


@asynccontextmanager
async def lab_running(
    redis_server: RedisServer, keys: Keys, work: Path, raw: Path
) -> AsyncIterator[Lab]:
    target = work / "target.raw"
    with target.open("wb") as file:
        file.truncate(DISK)
    async with (
        component_pair(redis_server, keys, work, COMPONENT_ENV) as pair,
        nbd_runner(target) as target_port,
    ):
        onprem_at = str((await pair.figures(ONPREM))["address"])
        await pair.figures(CACHE)
        host, port = onprem_at.rsplit(":", 1)
        with shaper_process(
            [(host, int(port)), ("127.0.0.1", target_port)],
            rate_bits=RATE_BITS,
            rtt_ms=RTT_MS,
            cwd=ROOT,
        ) as link:
            lease = await take_lease(pair.store, "bench")
            yield Lab(pair, keys, lease, link, work, raw, TcpAddress(host, int(port)), target_port)


@pytest.mark.bench
async def test_cache_bench(
    redis_server: RedisServer, keys: Keys, tmp_path_factory: pytest.TempPathFactory
) -> None:
    for tool in ("fio", "qemu-nbd", "qemu-img"):
        assert shutil.which(tool), f"{tool} is missing: make system-packages"
    work = tmp_path_factory.mktemp("cache-bench")
    raw = work / "src.raw"
    src_snapshot = await make_source(work / "src-disk", raw, DISK)
    epoch_snapshot = await make_empty(work / "epoch-disk", DISK)
    report = Report()
    report.commands[FERRY] = (
        "ferry-appliance component cache|onprem under the Supervisor, "
        + " ".join(f"{k}={v}" for k, v in COMPONENT_ENV.items())
        + f", open params working_set={2 * DISK}, upstream through the link"
    )
    async with lab_running(redis_server, keys, work, raw) as lab:
        await lab.open_onprem("src", work / "src-disk", src_snapshot)
        await lab.open_onprem("epoch", work / "epoch-disk", epoch_snapshot)
        pids = await lab.pids()
        report.rtt = await link_check(lab)
        report.epoch = await epoch_phase(lab, "epoch")
        report.copy = await full_copy(lab)
        for kind, pid in pids.items():
            report.rss_epoch[kind] = peak_rss_mb(pid)
            reset_peak_rss(pid)
        report.rss_qemu_cor = await hits_phase(lab, report.figures, report.commands, pids["cache"])
        await misses_phase(lab, report.figures)
        report.rss_fio = {kind: peak_rss_mb(pid) for kind, pid in pids.items()}
        assert await lab.pids() == pids, "a component restarted during the bench"
    stats = lab.link.stats
    report.link = (
        f"{stats.connections} connections, {stats.bytes_up / MIB:,.0f} MiB up, "
        f"{stats.bytes_down / MIB:,.0f} MiB down"
    )
    text = report.text()
    print(text)
    (ROOT / ".bench").mkdir(exist_ok=True)
    (ROOT / ".bench" / "cache.txt").write_text(text)
