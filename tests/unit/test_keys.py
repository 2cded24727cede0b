"""The appliance's key pair on disk, and starting only with what verification needs."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import structlog

from appliance import cli
from appliance.errors import KeyFileError, NotConfigured
from appliance.keys import KEY_FILE, load, load_or_create
from appliance.service.app import Appliance
from appliance.settings import Settings
from messages.keys import AppliancePublicKey


@pytest.fixture(autouse=True)
def _unconfigured_logging() -> Iterator[None]:
    """cli.main configures structlog onto this test's captured stderr: undo it after."""
    yield
    structlog.reset_defaults()


def test_the_key_pair_is_made_once_0600_and_kept(data_dir: Path) -> None:
    first = load_or_create(data_dir)
    path = data_dir / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create(data_dir).public == first.public  # a restart keeps the key
    assert [p.name for p in data_dir.iterdir()] == [KEY_FILE]  # no temporary file left


def test_processes_starting_at_once_end_up_with_one_key(tmp_path: Path) -> None:
    data_dir = tmp_path / "shared"
    with ThreadPoolExecutor(8) as pool:
        keys = list(pool.map(lambda _: load_or_create(data_dir).public.text, range(16)))
    assert len(set(keys)) == 1


def test_a_key_file_others_can_read_is_refused(data_dir: Path) -> None:
    load_or_create(data_dir)
    os.chmod(data_dir / KEY_FILE, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load(data_dir / KEY_FILE)


def test_a_damaged_key_file_is_refused_with_its_path(data_dir: Path) -> None:
    path = data_dir / KEY_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b'{"format": "ferry-appliance-key-v1", "ed25519_seed": "zz"}')
    os.close(fd)
    with pytest.raises(KeyFileError) as raised:
        load_or_create(data_dir)
    assert str(path) in str(raised.value)


def test_keys_show_prints_the_public_key_clients_pin(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--data-dir", str(data_dir), "keys", "show"]) == 0
    printed = capsys.readouterr().out.strip()
    assert AppliancePublicKey.parse(printed) == load_or_create(data_dir).public
    assert cli.main(["--data-dir", str(data_dir), "keys", "show", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["appliance_key"] == printed
    assert "seed" not in json.dumps(shown) and "secret" not in json.dumps(shown)


@pytest.mark.parametrize("token", [None, ""])
def test_the_appliance_refuses_to_start_without_a_bus_token(
    data_dir: Path, token: str | None
) -> None:
    settings = Settings(data_dir=data_dir, bus_token=token)  # type: ignore[arg-type]
    with pytest.raises(NotConfigured, match="FERRY_BUS_TOKEN"):
        asyncio.run(Appliance(settings).run(asyncio.Event()))
    assert not (data_dir / KEY_FILE).exists(), "refused before anything was made"


def test_ferry_appliance_run_without_a_token_exits_with_one_line(data_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
    env["FERRY_DATA_DIR"] = str(data_dir)
    result = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "FERRY_BUS_TOKEN" in lines[0], result.stderr
