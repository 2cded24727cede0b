"""Data path bench (``make bench``): Ferry's transfer engine vs qemu-img, nbdcopy, cp, rsync.

Every figure comes from one run on this machine, with warm page caches:

* Full copy of a lab-like disk (4 GiB, about half allocated: random,
  compressible and all-zero chunks, the rest holes) between two NBD endpoints
  on loopback, each our NBD server in its own process exporting a raw file.
  Ferry's engine runs in a subprocess of its own (peak RSS from its
  ``VmHWM``), with Redis checkpoints, per-chunk verification through
  the target's Ferry extension (hashed writes, checksums for the rest) and
  the whole-image check. Peers: ``qemu-img convert -n`` and ``nbdcopy``
  between the same endpoints (``nbdcopy`` both plain, as the issue's target
  names it, and with ``--flush``, which makes the target durable as Ferry
  and qemu-img do), and ``cp --sparse=always`` of the file.
* Incremental: 1% of the chunks changed at random through a LayeredDisk
  snapshot, then only the changes synced (engine reading the snapshot
  locally, writing to the NBD target) vs ``rsync --inplace --no-whole-file``.
* Hash and compression throughput.

The table is printed and written to ``.bench/datapath.txt``. The module is
also the subprocess entry point (``python -m tests.bench.test_datapath_bench``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis.asyncio as aioredis
import xxhash
import zstandard

from appliance.datapath.nbd import NbdBackend, NbdServer, TcpAddress
from appliance.datapath.transfer import Transfer, TransferOptions
from appliance.embedded import RedisServer
from appliance.logs import configure as configure_logs
from appliance.state.checkpoints import RedisCheckpointStore
from appliance.state.keys import Keys
from appliance.storage.disk_manifest import BASE_LAYER, data_file_name
from appliance.storage.file import FileBackend
from appliance.storage.layered import LayeredDisk
from tests.support.pagecache import settle
from tests.support.sparse import data_ranges

ROOT = Path(__file__).resolve().parents[2]
MIB = 1 << 20
GIB = 1 << 30
CHUNK = MIB
DISK = int(float(os.environ.get("FERRY_BENCH_DISK_GIB", "4")) * GIB)
SEED = 20260101
MODULE = "tests.bench.test_datapath_bench"
EXTRA = os.environ.get("FERRY_BENCH_EXTRA", "").split()
ROUNDS = int(os.environ.get("FERRY_BENCH_ROUNDS", "5"))


# -- the disk --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DiskContent:
    allocated: int
    zero_chunks: int

    @property
    def nonzero(self) -> int:
        return self.allocated - self.zero_chunks


def fill_source(path: Path, size: int, seed: int = SEED) -> DiskContent:
    """Runs of allocated chunks (60% random, 35% compressible, 5% zero) between holes."""
    rng = random.Random(seed)
    pool = rng.randbytes(64 * MIB)
    words = [b"ferry", b"disk", b"block", b"migrate", b"cloud", b"lab", b"kernel", b"log"]
    text = b" ".join(rng.choice(words) for _ in range(400_000))[: 2 * MIB]
    allocated = zeros = 0
    with path.open("wb") as file:
        file.truncate(size)
        index, chunks = 0, size // CHUNK
        while index < chunks:
            run = min(rng.randrange(1, 64), chunks - index)
            if rng.random() < 0.5:
                file.seek(index * CHUNK)
                for _ in range(run):
                    kind = rng.random()
                    if kind < 0.60:
                        at = rng.randrange(len(pool) - CHUNK)
                        file.write(pool[at : at + CHUNK])
                    elif kind < 0.95:
                        at = rng.randrange(MIB)
                        file.write(text[at : at + CHUNK])
                    else:
                        file.write(bytes(CHUNK))
                        zeros += CHUNK
                allocated += run * CHUNK
            index += run
    return DiskContent(allocated, zeros)


def allocated_bytes(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return sum(end - start for start, end in data_ranges(fd))
    finally:
        os.close(fd)


def data_sample(path: Path, length: int) -> bytes:
    """The first ``length`` bytes of non-zero chunks of a disk file."""
    sample = bytearray()
    with path.open("rb") as file:
        while len(sample) < length and (chunk := file.read(CHUNK)):
            if chunk.count(0) != len(chunk):
                sample += chunk
    return bytes(sample[:length])


def fresh_target(path: Path, size: int) -> Path:
    path.unlink(missing_ok=True)
    path.touch()
    os.truncate(path, size)
    return path


def same_content(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)], check=False).returncode == 0


# -- subprocesses: NBD servers and Ferry's copier -------------------------------------------------


async def serve(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with (
        FileBackend.open(args.file, readonly=args.readonly) as backend,
        NbdServer({args.export: backend}, address=TcpAddress("127.0.0.1", 0)) as server,
    ):
        print(f"READY {server.port}", flush=True)
        await stop.wait()


async def copy(args: argparse.Namespace) -> None:
    redis = aioredis.from_url(args.redis)
    store = RedisCheckpointStore(redis, Keys(args.prefix), args.transfer_id)
    options = TransferOptions(
        chunk_size=args.chunk_mib * MIB,
        workers=args.workers,
        verify_chunks=not args.no_verify,
        whole_image_check=not args.no_image_check,
        flush_interval_s=args.flush_interval,
    )
    started = time.monotonic()
    async with contextlib.AsyncExitStack() as stack:
        target = await NbdBackend.connect(TcpAddress("127.0.0.1", args.target_port), "dst")
        stack.push_async_callback(target.close)
        if args.layered:
            disk = await LayeredDisk.open(args.layered)
            stack.push_async_callback(disk.close)
            snapshots = {info.name: info.id for info in disk.snapshots()}
            source: Any = disk.at(snapshots[args.to_snapshot])
            extents = await disk.changed_extents(
                snapshots[args.from_snapshot], snapshots[args.to_snapshot]
            )
            source_link = None
        else:
            source = await NbdBackend.connect(TcpAddress("127.0.0.1", args.source_port), "src")
            stack.push_async_callback(source.close)
            extents = None
            source_link = source
        transfer = Transfer(
            args.transfer_id, source, target, checkpoints=store, extents=extents, options=options
        )
        transfer.set_source_queue_depth(args.queue_depth)
        result = await transfer.run()
        elapsed = time.monotonic() - started
        report = {
            "elapsed_s": round(elapsed, 4),
            # Rounded, so a phase that did not run reads 0.0, not 5.96e-06 or so.
            "stats": {
                name: round(value, 4) if isinstance(value, float) else value
                for name, value in asdict(result.stats).items()
            },
            "rss_mb": peak_rss_mb(),
            "target_sent": target.bytes_sent,
            "target_received": target.bytes_received,
            "source_sent": source_link.bytes_sent if source_link else 0,
            "source_received": source_link.bytes_received if source_link else 0,
            "digests_match": result.source_digest == result.target_digest,
        }
    await redis.aclose()
    print("RESULT " + json.dumps(report), flush=True)


def peak_rss_mb() -> float:
    """VmHWM: this process's peak RSS. Not ru_maxrss, which on Linux keeps the high-water
    mark of the forked parent's memory image across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def python_module(*args: str) -> list[str]:
    return [sys.executable, "-m", MODULE, *args]


def python_env() -> dict[str, str]:
    """Environment of our Python processes (NBD servers, Ferry's copier).

    glibc trims freed heap memory and maps large blocks afresh, so a Python
    process that allocates a new 1 MiB buffer per request (bytes from recv
    or pread) page-faults on every byte it moves: 80k faults per 300 MiB in
    the target server, twice its CPU time. Keeping freed memory around
    removes that. The servers serve every tool alike, so the peers gain too.
    """
    return os.environ | {
        "MALLOC_TRIM_THRESHOLD_": str(256 * MIB),
        "MALLOC_MMAP_THRESHOLD_": str(64 * MIB),
    }


@contextlib.contextmanager
def nbd_server(path: Path, export: str, *, readonly: bool) -> Iterator[tuple[int, psutil.Process]]:
    command = python_module("serve", "--file", str(path), "--export", export)
    if readonly:
        command.append("--readonly")
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, text=True, env=python_env()
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        while line and not line.startswith("READY "):
            line = process.stdout.readline()
        assert line.startswith("READY "), "NBD server did not start"
        yield int(line.split()[1]), psutil.Process(process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def run_copier(*args: str) -> dict[str, Any]:
    started = time.monotonic()
    result = subprocess.run(
        python_module("copy", *args),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env=python_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    report: dict[str, Any] = json.loads(line[7:])
    report["command_s"] = time.monotonic() - started  # interpreter start and imports too
    return report


@dataclass(frozen=True, slots=True)
class ToolRun:
    elapsed_s: float
    read_bytes: int
    output: str


def run_tool(command: list[str]) -> ToolRun:
    """Run a peer tool; its processes' bytes read (rchar) are sampled while it runs."""
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    read: dict[int, int] = {}
    root = psutil.Process(process.pid)
    while process.poll() is None:
        with contextlib.suppress(psutil.Error):
            for proc in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    read[proc.pid] = proc.io_counters().read_chars
        time.sleep(0.02)
    elapsed = time.monotonic() - started
    output = process.stdout.read() if process.stdout else ""
    if process.stdout is not None:
        process.stdout.close()
    assert process.returncode == 0, f"{command[0]} failed: {output[-2000:]}"
    return ToolRun(elapsed, sum(read.values()), output)


# -- hash and compression throughput ------------------------------------------------------------


def throughput_rows(sample: bytes) -> list[tuple[str, str]]:
    def rate(func: Any, rounds: int = 3) -> float:
        best = float("inf")
        for _ in range(rounds):
            started = time.perf_counter()
            func(sample)
            best = min(best, time.perf_counter() - started)
        return len(sample) / best / 1e6

    rows = [
        ("xxh3-128 (chunk hash)", f"{rate(xxhash.xxh3_128_digest):,.0f} MB/s"),
        ("sha256 (reference)", f"{rate(lambda d: hashlib.sha256(d).digest()):,.0f} MB/s"),
    ]
    try:
        import blake3  # type: ignore[import-not-found]

        rows.insert(1, ("BLAKE3", f"{rate(lambda d: blake3.blake3(d).digest()):,.0f} MB/s"))
    except ImportError:
        rows.insert(1, ("BLAKE3", "not installed"))
    for level in (1, 3):
        compressor = zstandard.ZstdCompressor(level=level)
        ratio = len(sample) / len(compressor.compress(sample))
        rows.append(
            (f"zstd level {level}", f"{rate(compressor.compress):,.0f} MB/s, ratio {ratio:.2f}")
        )
    ratio = len(sample) / len(zlib.compress(sample, 1))
    rows.append(
        ("zlib level 1", f"{rate(lambda d: zlib.compress(d, 1)):,.0f} MB/s, ratio {ratio:.2f}")
    )
    return rows


# -- the benchmark ---------------------------------------------------------------------------


def mb_s(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6


class Table:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def title(self, text: str) -> None:
        self.lines += ["", text, "-" * len(text)]

    def row(self, *cells: str) -> None:
        widths = (50, 12, 14, 50)
        self.lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=False)))

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


@pytest.mark.bench
def test_datapath_bench(
    redis_server: RedisServer, key_prefix: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    work = tmp_path_factory.mktemp("bench")
    source = work / "source.raw"
    content = fill_source(source, DISK)
    allocated = allocated_bytes(source)
    table = Table()
    table.lines.append(
        f"Ferry data path bench: {DISK / GIB:.1f} GiB disk, {allocated / GIB:.2f} GiB allocated "
        f"({content.zero_chunks / MIB:.0f} MiB of it all-zero chunks), chunk {CHUNK // MIB} MiB, "
        f"{os.cpu_count()} cores, warm page cache"
    )
    sample = data_sample(source, 64 * MIB)
    full = full_copy(work, source, allocated, content, redis_server, key_prefix, table)
    incremental(work, source, full, redis_server, key_prefix, table)
    table.title("Hash and compression throughput (64 MiB of lab-like data, one core)")
    for name, figure in throughput_rows(sample):
        table.row(name, figure)
    text = table.text()
    print(text)
    (ROOT / ".bench").mkdir(exist_ok=True)
    (ROOT / ".bench" / "datapath.txt").write_text(text)


@dataclass(frozen=True, slots=True)
class FullCopyOutcome:
    ferry_target: Path
    cp_target: Path


def copy_once(
    name: str, source: Path, target: Path, redis_server: RedisServer, prefix: str, round_: int
) -> tuple[float, dict[str, Any]]:
    """One full copy with one tool; returns its time (and Ferry's report).

    Every tool starts from the same state (:func:`settle`).
    """
    if name == "cp":
        target.unlink(missing_ok=True)
        settle(source)
        return run_tool(["cp", "--sparse=always", str(source), str(target)]).elapsed_s, {}
    fresh_target(target, DISK)
    settle(source)
    with (
        nbd_server(source, "src", readonly=True) as (src_port, _),
        nbd_server(target, "dst", readonly=False) as (dst_port, _),
    ):
        src, dst = f"nbd://127.0.0.1:{src_port}/src", f"nbd://127.0.0.1:{dst_port}/dst"
        if name == "ferry":
            report = run_copier(
                "--redis", redis_server.url, "--prefix", prefix, "--transfer-id", f"full-{round_}",
                "--source-port", str(src_port), "--target-port", str(dst_port), *EXTRA,
            )  # fmt: skip
            return report["elapsed_s"], report
        if name == "qemu":
            command = ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, dst]
            return run_tool(command).elapsed_s, {}
        flush = ["--flush"] if name == "nbdcopy-flush" else []
        return run_tool(["nbdcopy", *flush, src, dst]).elapsed_s, {}


FULL_COPY_LABELS = {
    "ferry": "Ferry engine (verified, whole-image check)",
    "qemu": "qemu-img convert -n (flushes at the end)",
    "nbdcopy": "nbdcopy (no flush: not durable)",
    "nbdcopy-flush": "nbdcopy --flush",
    "cp": "cp --sparse=always (file to file)",
}


def full_copy(
    work: Path,
    source: Path,
    allocated: int,
    content: DiskContent,
    redis_server: RedisServer,
    prefix: str,
    table: Table,
) -> FullCopyOutcome:
    names = tuple(FULL_COPY_LABELS)
    targets = {name: work / f"target-{name}.raw" for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    ferry_runs: list[dict[str, Any]] = []
    for round_ in range(ROUNDS):  # interleaved, so a busy moment hurts every tool alike
        for name in names:
            elapsed, report = copy_once(name, source, targets[name], redis_server, prefix, round_)
            assert same_content(source, targets[name]), f"{name} copy differs from the source"
            times[name].append(elapsed)
            if report:
                ferry_runs.append(report)
    for name in ("qemu", "nbdcopy", "nbdcopy-flush"):
        targets[name].unlink()
    ferry = sorted(ferry_runs, key=lambda report: report["elapsed_s"])[len(ferry_runs) // 2]
    peer_rows(table, allocated, times, ferry)
    wire_rows(table, allocated, content, ferry)
    assert ferry["digests_match"]
    return FullCopyOutcome(targets["ferry"], targets["cp"])


def peer_rows(
    table: Table, allocated: int, times: dict[str, list[float]], ferry: dict[str, Any]
) -> None:
    """Each tool's median time and rate, Ferry's ratio to it, and the issue's target."""
    stats = ferry["stats"]
    results = {name: statistics.median(runs) for name, runs in times.items()}
    rates = {name: mb_s(allocated, seconds) for name, seconds in results.items()}
    table.title(
        f"Full copy, NBD to NBD on loopback (MB/s of allocated data; median of {ROUNDS} rounds)"
    )
    table.row("tool", "time", "MB/s", "Ferry vs it; all times")
    for name, label in FULL_COPY_LABELS.items():
        ratio = "" if name == "ferry" else f"{rates['ferry'] / rates[name]:.2f}x; "
        every = ", ".join(f"{t:.2f}" for t in times[name])
        table.row(label, f"{results[name]:.2f} s", f"{rates[name]:,.0f}", f"{ratio}{every} s")
    table.row(
        "  of which Ferry: copy, then flush | check",
        f"{stats['copy_s']:.2f} s",
        f"{mb_s(allocated, stats['copy_s']):,.0f}",
        f"then flush {stats['sync_s']:.2f} s alongside check {stats['check_s']:.2f} s",
    )
    table.row(
        "  Ferry as a command (interpreter start too)",
        f"{ferry['command_s']:.2f} s",
        f"{mb_s(allocated, ferry['command_s']):,.0f}",
        "above: timed in its process, like the engine runs",
    )
    # The target: the faster of qemu-img and plain nbdcopy, which skips the flush
    # that Ferry and qemu-img pay for; the durable comparison is shown beside it.
    best = max(("qemu", "nbdcopy"), key=lambda name: rates[name])
    durable = max(("qemu", "nbdcopy-flush"), key=lambda name: rates[name])
    ratio_to_best = rates["ferry"] / rates[best]
    copy_only = mb_s(allocated, stats["copy_s"]) / rates[best]
    table.row(
        "target >= 0.7x the faster of qemu-img / nbdcopy",
        "",
        "",
        f"{ratio_to_best:.2f}x of {best} ({rates[best]:,.0f} MB/s): "
        f"{'met' if ratio_to_best >= 0.7 else 'MISSED'}"
        f" (copy phase alone {copy_only:.2f}x)",
    )
    table.row(
        "  beside it: vs the faster peer that flushes",
        "",
        "",
        f"{rates['ferry'] / rates[durable]:.2f}x of {FULL_COPY_LABELS[durable].split(' (')[0]}"
        f" ({rates[durable]:,.0f} MB/s)",
    )


def wire_rows(table: Table, allocated: int, content: DiskContent, ferry: dict[str, Any]) -> None:
    stats = ferry["stats"]
    wire = ferry["target_sent"] + ferry["target_received"]
    source_wire = ferry["source_sent"] + ferry["source_received"]
    table.title("Ferry's wire bytes and memory")
    table.row("allocated bytes at the source", f"{allocated / MIB:,.0f} MiB")
    table.row(
        "  of which non-zero data",
        f"{content.nonzero / MIB:,.0f} MiB",
        "",
        "(the rest: zero chunks)",
    )
    table.row(
        "target link (both ways)",
        f"{wire / MIB:,.0f} MiB",
        f"{wire / allocated:.4f}x",
        f"of allocated; {wire / content.nonzero:.4f}x of non-zero data",
    )
    table.row(
        "source link (both ways)",
        f"{source_wire / MIB:,.0f} MiB",
        f"{source_wire / allocated:.4f}x",
        "of allocated (reads of data extents + block status)",
    )
    table.row(
        "data written / zeroed / read back",
        f"{stats['bytes_written'] / MIB:,.0f} MiB",
        f"{stats['zero_bytes'] / MIB:,.0f} MiB",
        f"read back {stats['bytes_read_back']} B (checksum extension)",
    )
    table.row(
        "chunks verified by the write's digest",
        f"{stats['chunks_verified_on_write']:,}",
        f"of {stats['chunks_copied']:,}",
        "the rest by a checksum request (hashed writes)",
    )
    wire_ok = "met" if wire <= allocated * 1.02 else "MISSED"
    table.row("target: wire within 2% of allocated", "", "", wire_ok)
    rss_ok = "met" if ferry["rss_mb"] < 260 else "MISSED"
    table.row(
        "peak RSS of Ferry's copy process", f"{ferry['rss_mb']:.0f} MB", "", f"< 260: {rss_ok}"
    )


def change_one_percent(disk_writes: list[tuple[int, bytes]], seed: int = SEED + 1) -> None:
    rng = random.Random(seed)
    chunks = DISK // CHUNK
    for index in sorted(rng.sample(range(chunks), max(1, chunks // 100))):
        length = rng.randrange(16, 257) * 4096  # 64 KiB .. 1 MiB
        offset = index * CHUNK + rng.randrange(0, (CHUNK - length) // 4096 + 1) * 4096
        disk_writes.append((offset, rng.randbytes(length)))


async def build_layered(directory: Path, base: Path, writes: list[tuple[int, bytes]]) -> None:
    disk = await LayeredDisk.create(directory, DISK)
    await disk.close()
    # The base layer is a sparse raw file: start it as a copy of the source disk.
    base_file = directory / data_file_name(BASE_LAYER)
    copy = await asyncio.create_subprocess_exec("cp", "--sparse=always", str(base), str(base_file))
    assert await copy.wait() == 0
    async with await LayeredDisk.open(directory) as disk:
        await disk.snapshot("s1")
        view = disk.active()
        for offset, data in writes:
            await view.write(offset, data)
        await disk.snapshot("s2")
        await disk.flush()


def incremental(
    work: Path, source: Path, full: FullCopyOutcome, redis_server: RedisServer, prefix: str,
    table: Table,
) -> None:  # fmt: skip
    writes: list[tuple[int, bytes]] = []
    change_one_percent(writes)
    changed = sum(len(data) for _, data in writes)
    layered = work / "layered"
    asyncio.run(build_layered(layered, source, writes))
    source_v2 = work / "source-v2.raw"
    subprocess.run(["cp", "--sparse=always", str(source), str(source_v2)], check=True)
    with source_v2.open("r+b") as file:
        for offset, data in writes:
            file.seek(offset)
            file.write(data)
    source.unlink()  # keep the page cache for what is measured next

    runs: dict[str, dict[str, Any]] = {}
    for label, extra in (("ferry", ["--no-image-check"]), ("ferry+check", [])):
        target = full.ferry_target
        if label == "ferry+check":  # sync a second copy of v1 so both start from the same state
            target = work / "target-ferry-2.raw"
            subprocess.run(["cp", "--sparse=always", str(full.cp_target), str(target)], check=True)
        with nbd_server(target, "dst", readonly=False) as (dst_port, server):
            io_before = server.io_counters().read_chars
            runs[label] = run_copier(
                "--redis", redis_server.url, "--prefix", prefix, "--transfer-id", f"incr-{label}",
                "--target-port", str(dst_port), "--layered", str(layered),
                "--from-snapshot", "s1", "--to-snapshot", "s2", *extra,
            )  # fmt: skip
            runs[label]["target_read"] = server.io_counters().read_chars - io_before
        assert same_content(source_v2, target), f"{label} incremental sync differs"
        if label == "ferry+check":
            target.unlink()

    rsync = run_tool(
        ["rsync", "--inplace", "--no-whole-file", "--stats", str(source_v2), str(full.cp_target)]
    )
    assert same_content(source_v2, full.cp_target), "rsync result differs"
    rsync_sent = _rsync_stat(rsync.output, "Total bytes sent")
    rsync_literal = _rsync_stat(rsync.output, "Literal data")

    table.title(
        f"Incremental sync: {DISK // CHUNK // 100} chunks (1%) changed, "
        f"{changed / MIB:.1f} MiB written"
    )
    table.row("tool", "time", "vs rsync", "bytes read / bytes sent")
    for label, run in runs.items():
        stats = run["stats"]
        name = "Ferry, changed extents only" + (" + whole-image check" if label != "ferry" else "")
        table.row(
            name,
            f"{run['elapsed_s']:.2f} s",
            f"{rsync.elapsed_s / run['elapsed_s']:.1f}x faster",
            f"read {(stats['bytes_read'] + run['target_read']) / MIB:,.1f} MiB "
            f"(source {stats['bytes_read'] / MIB:,.1f}), "
            f"sent {run['target_sent'] / MIB:,.1f} MiB",
        )
    table.row(
        "rsync --inplace --no-whole-file",
        f"{rsync.elapsed_s:.2f} s",
        "1.0x",
        f"read {rsync.read_bytes / MIB:,.0f} MiB*, sent {rsync_sent / MIB:,.1f} MiB "
        f"(literal {rsync_literal / MIB:,.1f} MiB)",
    )
    table.row(
        "  * rsync reads both files whole; its figure",
        "",
        "",
        "is read() bytes, pipes between its processes too",
    )
    speedup = rsync.elapsed_s / runs["ferry"]["elapsed_s"]
    table.row(
        "target >= 10x faster than rsync",
        "",
        "",
        f"{speedup:.1f}x: {'met' if speedup >= 10 else 'MISSED'}",
    )


def _rsync_stat(output: str, name: str) -> int:
    for line in output.splitlines():
        if line.startswith(name + ":"):
            return int(line.split(":")[1].split()[0].replace(",", ""))
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description="subprocesses of the data path bench")
    commands = parser.add_subparsers(dest="command", required=True)
    server = commands.add_parser("serve")
    server.add_argument("--file", required=True)
    server.add_argument("--export", required=True)
    server.add_argument("--readonly", action="store_true")
    copier = commands.add_parser("copy")
    for option in ("--redis", "--prefix", "--transfer-id"):
        copier.add_argument(option, required=True)
    copier.add_argument("--source-port", type=int, default=0)
    copier.add_argument("--target-port", type=int, required=True)
    copier.add_argument("--layered")
    copier.add_argument("--from-snapshot")
    copier.add_argument("--to-snapshot")
    copier.add_argument("--no-image-check", action="store_true")
    copier.add_argument("--flush-interval", type=float, default=TransferOptions().flush_interval_s)
    copier.add_argument("--no-verify", action="store_true")
    copier.add_argument("--chunk-mib", type=int, default=CHUNK // MIB)
    copier.add_argument("--workers", type=int, default=8)
    copier.add_argument("--queue-depth", type=int, default=4)
    args = parser.parse_args()
    configure_logs(level="warning")
    asyncio.run(serve(args) if args.command == "serve" else copy(args))


if __name__ == "__main__":
    main()
