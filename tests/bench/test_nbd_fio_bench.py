"""``make bench``: per-request cost of Ferry's NBD server beside qemu-nbd, loaded by fio.

fio's ``nbd`` engine (libnbd, one connection) runs three workloads against
each server, one server at a time, each workload for ``RUNTIME_S`` seconds:

* 4 KiB random read, queue depth 16;
* 4 KiB random write, queue depth 16;
* 1 MiB sequential read, queue depth 16 (wrapping round the disk).

The servers, each its own process on 127.0.0.1, all exporting the same
1 GiB raw file of random data through the page cache:

* Ferry: :mod:`tests.support.nbd_runner` (``NbdServer`` over ``FileBackend``,
  its loop run the way the appliance's processes run theirs);
* qemu-nbd raw, the ceiling: ``qemu-nbd -f raw --cache=writeback --aio=threads``
  (qemu-nbd's defaults, spelled out: writes land in the page cache, FLUSH
  calls fdatasync, as Ferry's file backend does);
* qemu-nbd qcow2 overlay: a fresh qcow2 whose backing file is the raw file,
  behind qemu's ``copy-on-read`` filter (``--image-opts``), same cache mode:
  the nearest peer of a read-through cache. An untimed sequential pass first
  pulls the whole disk into the overlay, so the timed runs are cache hits.

Before each server the page cache is settled (:func:`settle`: written back,
dropped as root), then the raw file is rewritten in 4 KiB pieces and synced,
and an untimed sequential pass reads the whole export once: every server
finds the file in the page cache, clean, in 4 KiB folios. The 4 KiB rewrite
matters: a file warmed by large sequential reads sits in the page cache as
large folios, and on this kernel (6.18, ext4) a 4 KiB pwrite into one costs
~50 us (30 us of CPU) against ~2 us into a 4 KiB folio (measured with a
plain Python pwrite loop), which would bound Ferry and qemu-nbd raw alike
and hide the servers' own cost (and vary with memory fragmentation from run
to run). The table gives IOPS and MB/s, the ratio to qemu-nbd raw and to the
qcow2 overlay, and each server's peak RSS (VmHWM). Each workload runs
``ROUNDS`` times (servers interleaved) and the best round counts, since the
two cores are shared with whatever else runs.

Run it alone: ``.venv/bin/python -m pytest -p no:cacheprovider
tests/bench/test_nbd_fio_bench.py -m bench -s``. The table is printed and
written to ``.bench/nbd_fio.txt``. Environment: ``FERRY_BENCH_RUNTIME_S``
(default 6), ``FERRY_BENCH_ROUNDS`` (default 2), ``FERRY_BENCH_FERRY_ROOT``
(a checkout whose ``tests.support.nbd_runner`` serves as Ferry: the code
before a change, say; default this one).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.pagecache import settle

pytestmark = [pytest.mark.bench, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024
PAGE = 4096
DISK = 1024 * MIB
EXPORT = "disk"
RUNTIME_S = int(os.environ.get("FERRY_BENCH_RUNTIME_S", "6"))
FERRY_ROOT = Path(os.environ.get("FERRY_BENCH_FERRY_ROOT", str(ROOT)))
ROUNDS = int(os.environ.get("FERRY_BENCH_ROUNDS", "2"))
QEMU_CACHE = ["--cache=writeback", "--aio=threads"]


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    rw: str
    block: str
    iodepth: int = 16

    @property
    def direction(self) -> str:
        return "write" if "write" in self.rw else "read"


WORKLOADS = (
    Workload("4 KiB random read QD16", "randread", "4k"),
    Workload("4 KiB random write QD16", "randwrite", "4k"),
    Workload("1 MiB sequential read QD16", "read", "1m"),
)


@dataclass(frozen=True, slots=True)
class Figure:
    iops: float
    mb_s: float


@dataclass
class ServerResult:
    label: str
    command: str = ""
    figures: dict[str, Figure] = field(default_factory=dict)
    peak_rss_mb: float = 0.0

    def keep_best(self, workload: Workload, figure: Figure) -> None:
        best = self.figures.get(workload.name)
        if best is None or figure.iops > best.iops:
            self.figures[workload.name] = figure


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def fill(path: Path, size: int) -> None:
    """Random data in 4 KiB writes, synced: all data (no holes), in 4 KiB folios."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for base in range(0, size, 16 * MIB):
            piece = memoryview(os.urandom(16 * MIB))
            for at in range(0, len(piece), PAGE):
                os.pwrite(fd, piece[at : at + PAGE], base + at)
        os.fsync(fd)
    finally:
        os.close(fd)


def fio(url: str, workload: Workload, runtime_s: int | None) -> Figure:
    """One fio run; ``runtime_s`` None makes it one untimed pass over the whole export."""
    command = [
        "fio",
        "--name=bench",
        "--ioengine=nbd",
        f"--uri={url}",
        f"--rw={workload.rw}",
        f"--bs={workload.block}",
        f"--iodepth={workload.iodepth}",
        "--numjobs=1",
        "--norandommap",
        "--randrepeat=0",
        "--output-format=json",
    ]
    if runtime_s is not None:
        command += ["--time_based", f"--runtime={runtime_s}", "--ramp_time=1"]
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=300)
    assert result.returncode == 0, f"fio failed: {result.stderr[-2000:]}{result.stdout[-2000:]}"
    job = json.loads(result.stdout[result.stdout.index("{") :])["jobs"][0]
    assert job["error"] == 0, f"fio reported error {job['error']}"
    stats = job[workload.direction]
    return Figure(iops=float(stats["iops"]), mb_s=float(stats["bw_bytes"]) / 1e6)


@contextlib.contextmanager
def running(command: list[str], *, ready_line: bool) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """Start a server; Ferry's runner prints its port, qemu-nbd is given one."""
    port = 0 if ready_line else free_port()
    if not ready_line:
        command = [*command, "-p", str(port)]
    process = subprocess.Popen(
        command, cwd=FERRY_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        if ready_line:
            assert process.stdout is not None
            line = process.stdout.readline()
            while line and not line.startswith("READY "):
                line = process.stdout.readline()
            assert line.startswith("READY "), "Ferry's NBD server did not start"
            port = int(line.split()[1])
        else:
            wait_listening(process, port)
        yield process, port
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def wait_listening(process: subprocess.Popen[str], port: int) -> None:
    """Connect until qemu-nbd accepts (it prints nothing when ready)."""
    for _ in range(500):
        assert process.poll() is None, "qemu-nbd exited"
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=0.02)
    raise AssertionError(f"qemu-nbd never listened on {port}")


def server_commands(raw: Path, overlay: Path) -> list[tuple[str, list[str], bool]]:
    ferry = [sys.executable, "-m", "tests.support.nbd_runner", str(raw), "--export", EXPORT]
    qemu = ["qemu-nbd", "--persistent", "-x", EXPORT, "-b", "127.0.0.1", *QEMU_CACHE]
    cor = (
        f"driver=copy-on-read,file.driver=qcow2,file.file.driver=file,file.file.filename={overlay}"
    )
    return [
        ("Ferry NbdServer (raw file)", ferry, True),
        ("qemu-nbd raw", [*qemu, "-f", "raw", str(raw)], False),
        ("qemu-nbd qcow2 overlay, copy-on-read", [*qemu, "--image-opts", cor], False),
    ]


def make_overlay(raw: Path, overlay: Path) -> None:
    overlay.unlink(missing_ok=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(raw), "-F", "raw", str(overlay)],
        check=True,
    )


def one_round(raw: Path, overlay: Path, results: list[ServerResult]) -> None:
    for result, (label, command, ready_line) in zip(
        results, server_commands(raw, overlay), strict=True
    ):
        assert result.label == label
        result.command = " ".join(command)
        settle()
        fill(raw, DISK)
        make_overlay(raw, overlay)
        with running(command, ready_line=ready_line) as (process, port):
            url = f"nbd://127.0.0.1:{port}/{EXPORT}"
            fio(url, Workload("warm-up pass", "read", "1m"), None)
            for workload in WORKLOADS:
                result.keep_best(workload, fio(url, workload, RUNTIME_S))
            result.peak_rss_mb = max(result.peak_rss_mb, peak_rss_mb(process.pid))


def table(results: list[ServerResult]) -> str:
    raw, overlay = results[1], results[2]
    lines = [
        f"NBD server per-request cost: fio nbd engine, one connection, {DISK // MIB} MiB raw "
        f"file of random data in the page cache, {RUNTIME_S} s per run, best of {ROUNDS} "
        f"round(s), {os.cpu_count()} cores, Ferry from {FERRY_ROOT}",
        "",
        f"{'server':40}{'workload':30}{'IOPS':>10}{'MB/s':>10}{'vs raw':>9}{'vs qcow2':>10}",
    ]
    for result in results:
        for workload in WORKLOADS:
            figure = result.figures[workload.name]
            base = raw.figures[workload.name].iops
            peer = overlay.figures[workload.name].iops
            lines.append(
                f"{result.label:40}{workload.name:30}{figure.iops:10.0f}{figure.mb_s:10.1f}"
                f"{figure.iops / base:8.2f}x{figure.iops / peer:9.2f}x"
            )
    lines += ["", f"{'server':40}{'peak RSS (VmHWM)':>20}"]
    lines += [f"{r.label:40}{r.peak_rss_mb:17.1f} MB" for r in results]
    lines += ["", "Commands:"]
    lines += [f"  {r.label}: {r.command}" for r in results]
    return "\n".join(lines) + "\n"


@pytest.mark.bench
def test_nbd_fio_bench(tmp_path_factory: pytest.TempPathFactory) -> None:
    for tool in ("fio", "qemu-nbd", "qemu-img"):
        assert shutil.which(tool), f"{tool} is missing: make system-packages"
    work = tmp_path_factory.mktemp("nbd-fio")
    raw, overlay = work / "disk.raw", work / "overlay.qcow2"
    results = [ServerResult(label) for label, _, _ in server_commands(raw, overlay)]
    for _ in range(ROUNDS):
        one_round(raw, overlay, results)
    text = table(results)
    print(text)
    (ROOT / ".bench").mkdir(exist_ok=True)
    (ROOT / ".bench" / "nbd_fio.txt").write_text(text)
