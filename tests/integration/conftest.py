"""Integration fixtures: one LocalStack per session, an appliance and a client per test."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.embedded import RedisServer
from appliance.keys import load_or_create
from appliance.service.app import Appliance
from appliance.service.wiring import WanLink
from appliance.settings import Settings
from clients.config import ClientSettings

ROOT = Path(__file__).resolve().parents[2]
RUNNER = ROOT / "localstack" / "run.py"
TOKEN = "integration-token-" + uuid.uuid4().hex


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.path):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def localstack() -> Iterator[str]:
    """LocalStack on 127.0.0.1:4566: reused if already up, else started and stopped by PID."""
    sys.path.insert(0, str(RUNNER.parent))
    try:
        import run as localstack_runner  # type: ignore[import-not-found]  # localstack/run.py
    finally:
        sys.path.pop(0)
    started = False
    if not localstack_runner.healthy():
        if not localstack_runner.VENV_PYTHON.exists():
            pytest.fail("LocalStack's virtualenv is missing: run 'make localstack-venv'", False)
        result = subprocess.run([sys.executable, str(RUNNER), "up"], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.fail(f"LocalStack did not start: {result.stderr[-2000:]}", False)
        started = True
    yield localstack_runner.ENDPOINT
    if started:
        subprocess.run([sys.executable, str(RUNNER), "down"], check=False)


@dataclass
class Harness:
    """Names and places one test's appliance uses; unique per test."""

    endpoint: str
    redis_url: str
    prefix: str
    data_dir: Path
    suffix: str

    def settings(self, **overrides: object) -> Settings:
        values: dict[str, object] = {
            "appliance_id": f"ferry-it-{self.suffix}",
            "data_dir": self.data_dir,
            "sqs_endpoint": self.endpoint,
            "command_queue": f"cmd-{self.suffix}",
            "response_queue": f"rsp-{self.suffix}",
            "dead_letter_queue": f"dlq-{self.suffix}",
            "bus_token": TOKEN,
            "redis_url": self.redis_url,
            "redis_prefix": self.prefix,
            "receive_wait_s": 1,
            "visibility_timeout_s": 10,
            "heartbeat_interval_s": 0.5,
            "drain_timeout_s": 5,
        }
        values.update(overrides)
        return Settings(**values)  # type: ignore[arg-type]

    def env(self, **overrides: object) -> dict[str, str]:
        """The same settings as FERRY_* environment variables, for a subprocess."""
        settings = self.settings(**overrides)
        env = {
            f"FERRY_{name.upper()}": str(value)
            for name, value in settings.model_dump(exclude_none=True).items()
            if not hasattr(value, "get_secret_value")
        }
        env["FERRY_BUS_TOKEN"] = TOKEN
        env["FERRY_REDIS_URL"] = self.redis_url
        return env

    @property
    def appliance_key(self) -> str:
        """The public key of this test's appliance: its key pair is made here, before the
        appliance starts (it uses the one it finds in its data dir), so clients can pin it."""
        return load_or_create(self.data_dir).public.text

    def client_settings(self) -> ClientSettings:
        return ClientSettings(
            sqs_endpoint=self.endpoint,
            command_queue=f"cmd-{self.suffix}",
            response_queue=f"rsp-{self.suffix}",
            bus_token=TOKEN,  # type: ignore[arg-type]
            appliance_key=self.appliance_key,
            receive_wait_s=1,
        )


@pytest.fixture
def harness(localstack: str, redis_server: RedisServer, key_prefix: str, data_dir: Path) -> Harness:
    return Harness(localstack, redis_server.url, key_prefix, data_dir, uuid.uuid4().hex[:10])


class RunningAppliance:
    """An appliance running as a task of the test's event loop."""

    def __init__(self, settings: Settings, wan: WanLink | None = None) -> None:
        self.settings = settings
        self.appliance = Appliance(settings, wan=wan)
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> RunningAppliance:
        self.task = asyncio.create_task(self.appliance.run(self.stop))
        started = asyncio.create_task(self.appliance.started.wait())
        await asyncio.wait({self.task, started}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        if self.task.done():
            started.cancel()
            self.task.result()
        assert started.done(), "appliance did not start within 60 s"
        return self

    async def shutdown(self) -> None:
        self.stop.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, timeout=60)


@pytest.fixture
async def start_appliance() -> AsyncIterator[object]:
    running: list[RunningAppliance] = []

    async def start(settings: Settings, wan: WanLink | None = None) -> RunningAppliance:
        appliance = await RunningAppliance(settings, wan).start()
        running.append(appliance)
        return appliance

    yield start
    for appliance in running:
        with contextlib.suppress(Exception):
            await appliance.shutdown()
