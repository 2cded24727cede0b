"""``make bench``: command round trips through SQS, LocalStack beside the embedded moto server.

Prints, for each backend, inventory round-trip latency (p50/p95 over 200
sequential requests), sustained commands per second (500 commands in flight
at once), and the appliance's peak RSS. The appliance runs as its own process,
as in production; the client is this process.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from appliance.embedded import RedisServer
from appliance.sites.lab.create import create_lab
from appliance.sites.lab.sample import SampleSpec
from clients.client import FerryClient
from clients.config import ClientSettings
from messages.commands import SourceInventoryRequest, SourceInventoryRequestBody
from tests.integration.conftest import localstack  # noqa: F401  (the session fixture)

pytestmark = pytest.mark.bench
TOKEN = "bench-" + uuid.uuid4().hex
LATENCY_REQUESTS = 200
THROUGHPUT_COMMANDS = 500
RESULTS = Path(".bench")


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _start(data_dir: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    await create_lab(data_dir, SampleSpec(vms=50, seed=1), fill=False)
    process = await asyncio.to_thread(
        subprocess.Popen,
        [sys.executable, "-m", "appliance.cli", "run"],
        env={**os.environ, **env, "FERRY_DATA_DIR": str(data_dir), "FERRY_BUS_TOKEN": TOKEN,
             "FERRY_LOG_LEVEL": "warning", "FERRY_MAX_IN_FLIGHT": "64"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not (data_dir / "runtime.json").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()  # never leave one running behind a failed bench
            await asyncio.to_thread(process.wait)
            raise AssertionError("appliance did not start")
        await asyncio.sleep(0.1)
    return process


async def _measure(runtime: Path) -> dict[str, float]:
    settings = ClientSettings.load(runtime, bus_token=TOKEN, receive_wait_s=20)
    async with FerryClient(settings) as client:
        page = SourceInventoryRequestBody(page_size=10)
        for _ in range(10):  # warm up connections
            await client.request(SourceInventoryRequest(body=page))
        latencies = []
        for _ in range(LATENCY_REQUESTS):
            started = time.perf_counter()
            answer = await client.request(SourceInventoryRequest(body=page))
            latencies.append((time.perf_counter() - started) * 1000)
            client.forget(answer.correlation_id)
        commands = [SourceInventoryRequest(body=page) for _ in range(THROUGHPUT_COMMANDS)]
        started = time.perf_counter()
        sender = asyncio.Semaphore(32)

        async def one(command: SourceInventoryRequest) -> None:
            async with sender:
                await client.send(command)
            await client.next_answer(command.correlation_id, timeout_s=120)

        await asyncio.gather(*(one(c) for c in commands))
        elapsed = time.perf_counter() - started
    quantiles = statistics.quantiles(latencies, n=100)
    return {"p50_ms": quantiles[49], "p95_ms": quantiles[94], "cmd_per_s": len(commands) / elapsed}


async def _run_backend(data_dir: Path, env: dict[str, str]) -> dict[str, float]:
    process = await _start(data_dir, env)
    try:
        figures = await _measure(data_dir / "runtime.json")
        figures["appliance_peak_rss_mib"] = _peak_rss_mib(process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(process.wait, 60)
    return figures


async def test_bus_round_trip_and_throughput(localstack: str, tmp_path: Path) -> None:  # noqa: F811
    async with RedisServer(tmp_path / "redis") as redis:
        suffix = uuid.uuid4().hex[:8]
        on_localstack = await _run_backend(
            tmp_path / "localstack",
            {
                "FERRY_SQS_ENDPOINT": localstack,
                "FERRY_REDIS_URL": redis.url,
                "FERRY_REDIS_PREFIX": f"bench-{suffix}",
                "FERRY_COMMAND_QUEUE": f"bench-cmd-{suffix}",
                "FERRY_RESPONSE_QUEUE": f"bench-rsp-{suffix}",
                "FERRY_DEAD_LETTER_QUEUE": f"bench-dlq-{suffix}",
            },
        )
    on_moto = await _run_backend(tmp_path / "moto", {})
    rows = [
        ("inventory round trip p50 (ms)", "p50_ms", "{:.1f}"),
        ("inventory round trip p95 (ms)", "p95_ms", "{:.1f}"),
        (f"commands/s ({THROUGHPUT_COMMANDS} in flight)", "cmd_per_s", "{:.0f}"),
        ("appliance peak RSS (MiB)", "appliance_peak_rss_mib", "{:.0f}"),
    ]
    lines = [
        f"Ferry control plane over SQS ({LATENCY_REQUESTS} sequential requests; one run)",
        f"{'':40} {'LocalStack 4.9':>16} {'embedded moto':>16} {'moto/LS':>8}",
    ]
    for label, key, fmt in rows:
        ratio = on_moto[key] / on_localstack[key] if on_localstack[key] else float("nan")
        lines.append(
            f"{label:40} {fmt.format(on_localstack[key]):>16} "
            f"{fmt.format(on_moto[key]):>16} {ratio:>8.2f}"
        )
    report = "\n".join(lines)
    print("\n" + report)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bus.txt").write_text(report + "\n")
    assert on_localstack["cmd_per_s"] > 0 and on_moto["cmd_per_s"] > 0
