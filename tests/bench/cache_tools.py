"""Tools of the cache bench (test_cache_bench.py): fio, qemu-nbd, Ferry's NBD server, lab disks.

Also the data path's full copy as a process of its own:
``python -m tests.bench.cache_tools copy SOURCE TARGET_PORT`` copies the raw
file SOURCE to the export ``disk`` at 127.0.0.1:TARGET_PORT with the
``Transfer`` engine's default options and prints ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import xxhash

from appliance.datapath.checkpoint import MemoryCheckpointStore
from appliance.datapath.nbd import NbdBackend
from appliance.datapath.nbd.channel import TcpAddress
from appliance.datapath.transfer import Transfer, TransferOptions
from appliance.storage.file import FileBackend
from appliance.storage.layered import LayeredDisk

ROOT = Path(__file__).resolve().parents[2]
MIB = 1 << 20
QEMU_CACHE = ["--cache=writeback", "--aio=threads"]
PIECE = 4 * MIB
FOLIO = 64 * 1024
"""The raw file is written in pieces of the cache's chunk and qcow2's cluster: the page
cache then holds all three servers' files in folios of one size (a 4 KiB write into a
large folio costs several times more: see test_nbd_fio_bench)."""
STOP_GRACE_S = 30.0


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    rw: str
    block: str
    iodepth: int = 16

    @property
    def direction(self) -> str:
        return "write" if "write" in self.rw else "read"


@dataclass(frozen=True, slots=True)
class Figure:
    iops: float
    mb_s: float
    latency_ms: float = 0.0
    """Mean time from submission to completion of a request."""


# -- tools ---------------------------------------------------------------------------------------


async def fio(
    url: str, workload: Workload, *, runtime_s: int | None, extra: tuple[str, ...] = ()
) -> Figure:
    """One fio run; ``runtime_s`` None makes it one pass over the whole export."""
    command = [
        "fio", "--name=bench", "--ioengine=nbd", f"--uri={url}", f"--rw={workload.rw}",
        f"--bs={workload.block}", f"--iodepth={workload.iodepth}", "--numjobs=1",
        "--norandommap", "--randrepeat=0", "--output-format=json", *extra,
    ]  # fmt: skip
    if runtime_s is not None:
        command += ["--time_based", f"--runtime={runtime_s}", "--ramp_time=1"]
    result = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, check=False, timeout=1800
    )
    assert result.returncode == 0, f"fio failed: {result.stderr[-2000:]}{result.stdout[-2000:]}"
    job = json.loads(result.stdout[result.stdout.index("{") :])["jobs"][0]
    assert job["error"] == 0, f"fio reported error {job['error']}"
    stats = job[workload.direction]
    return Figure(
        iops=float(stats["iops"]),
        mb_s=float(stats["bw_bytes"]) / 1e6,
        latency_ms=float(stats["lat_ns"]["mean"]) / 1e6,
    )


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for {pid}")


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reset_peak_rss(pid: int) -> None:
    """Peak RSS from now on (Linux >= 4.0: ``5`` into clear_refs resets VmHWM)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5\n")


@dataclass
class QemuNbd:
    """qemu-nbd daemonised by ``--fork`` (it returns once it listens); stopped by PID."""

    label: str
    args: list[str]
    port: int = 0
    pid: int = 0
    pid_file: Path | None = None

    @property
    def url(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/disk"

    @property
    def command(self) -> str:
        return " ".join(["qemu-nbd", *QEMU_CACHE, *self.args])

    def start(self, pid_file: Path, port: int) -> None:
        self.port, self.pid_file = port, pid_file
        pid_file.unlink(missing_ok=True)
        command = ["qemu-nbd", "--fork", f"--pid-file={pid_file}", "--persistent", "-x", "disk"]
        command += ["-b", "127.0.0.1", "-p", str(port), *QEMU_CACHE, *self.args]
        subprocess.run(command, check=True, timeout=120)
        self.pid = int(pid_file.read_text())

    def stop(self) -> None:
        """SIGTERM by PID, then wait for the exit on a pidfd (it is not our child)."""
        if not self.pid:
            return
        pid, self.pid = self.pid, 0
        try:
            handle = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        try:
            os.kill(pid, signal.SIGTERM)
            if not select.select([handle], [], [], STOP_GRACE_S)[0]:
                os.kill(pid, signal.SIGKILL)
                select.select([handle], [], [], STOP_GRACE_S)
        finally:
            os.close(handle)


def free_port() -> int:

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def qemu_nbd(label: str, args: list[str], work: Path) -> AsyncIterator[QemuNbd]:
    server = QemuNbd(label, args)
    name = label.replace(" ", "-").replace(",", "")
    await asyncio.to_thread(server.start, work / f"{name}.pid", free_port())
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


def overlay(path: Path, backing_url: str) -> list[str]:
    """A fresh qcow2 over ``backing_url``, and qemu-nbd's arguments to serve it copy-on-read."""
    path.unlink(missing_ok=True)
    create = ["qemu-img", "create", "-q", "-f", "qcow2", "-b", backing_url, "-F", "raw", str(path)]
    subprocess.run(create, check=True, timeout=120)
    return [
        "--image-opts",
        f"driver=copy-on-read,file.driver=qcow2,file.file.driver=file,file.file.filename={path}",
    ]


# -- the lab -------------------------------------------------------------------------------------


async def make_source(disk_dir: Path, raw: Path, size: int) -> str:
    """A lab disk of random bytes with its migrate-time snapshot, and the same bytes raw."""
    async with await LayeredDisk.create(disk_dir, size, granularity=64 * 1024) as disk:
        view = disk.active()
        with raw.open("wb") as file:
            for offset in range(0, size, PIECE):
                data = os.urandom(min(PIECE, size - offset))
                for at in range(0, len(data), FOLIO):
                    file.write(data[at : at + FOLIO])
                await view.write(offset, data)
            os.fsync(file.fileno())
        await disk.flush()
        return (await disk.snapshot("migrate")).id


async def make_empty(disk_dir: Path, size: int) -> str:
    async with await LayeredDisk.create(disk_dir, size, granularity=64 * 1024) as disk:
        return (await disk.snapshot("migrate")).id


async def digest(address: TcpAddress, export: str) -> str:
    """xxh3-128 of an NBD export's bytes."""
    hasher = xxhash.xxh3_128()
    async with await NbdBackend.connect(address, export) as backend:
        for offset in range(0, backend.size, PIECE):
            hasher.update(await backend.read(offset, min(PIECE, backend.size - offset)))
    return hasher.hexdigest()


def file_digest(path: Path) -> str:
    hasher = xxhash.xxh3_128()
    with path.open("rb") as file:
        while piece := file.read(PIECE):
            hasher.update(piece)
    return hasher.hexdigest()


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def copy_main(source: Path, target_port: int) -> None:
    """Subprocess: ``Transfer`` with the data path's default options, checkpoints in memory."""
    started = time.monotonic()
    async with (
        FileBackend.open(source, readonly=True) as backend,
        await NbdBackend.connect(TcpAddress("127.0.0.1", target_port), "disk") as target,
    ):
        transfer = Transfer(
            "bench-full-copy",
            backend,
            target,
            checkpoints=MemoryCheckpointStore(),
            options=TransferOptions(),
        )
        result = await transfer.run()
    elapsed = time.monotonic() - started
    report = {
        "elapsed_s": elapsed,
        "rss_mb": peak_rss_mb(os.getpid()),
        "digests_match": result.source_digest == result.target_digest,
    }
    print("RESULT " + json.dumps(report), flush=True)


@asynccontextmanager
async def nbd_runner(path: Path) -> AsyncIterator[int]:
    """Ferry's NBD server on a raw file, its own process; stopped by PID."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.support.nbd_runner", str(path), "--export", "disk",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = "-"
        while line and not line.startswith("READY "):  # logs come first
            line = (await process.stdout.readline()).decode()
        assert line.startswith("READY "), "the NBD server did not start"
        drain = asyncio.create_task(process.stdout.read())  # its logs, so it never blocks
        yield int(line.split()[1])
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        await process.wait()
    await drain


def main() -> None:
    parser = argparse.ArgumentParser(description="the cache bench's full-copy process")
    parser.add_argument("verb", choices=["copy"])
    parser.add_argument("source", type=Path)
    parser.add_argument("target_port", type=int)
    args = parser.parse_args()
    from appliance.cli import run_async

    run_async(copy_main(args.source, args.target_port))


if __name__ == "__main__":
    main()
