"""The client side of the keys: which appliance key is pinned, and credentials sealed by
``ferry migrate`` before they leave the machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clients.cli import parser
from clients.config import ClientSettings
from clients.migrate import clone_request
from messages.keys import ApplianceKeyPair

KEYS = ApplianceKeyPair.generate()


def _runtime(tmp_path: Path, key: str) -> Path:
    path = tmp_path / "runtime.json"
    path.write_text(
        json.dumps(
            {
                "sqs_endpoint": "http://127.0.0.1:1",
                "region": "us-east-1",
                "command_queue_url": "http://127.0.0.1:1/q/c",
                "response_queue_url": "http://127.0.0.1:1/q/r",
                "appliance_key": key,
            }
        )
    )
    return path


def test_no_pinned_key_means_no_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FERRY_APPLIANCE_KEY", raising=False)
    with pytest.raises(ValueError, match="no appliance key pinned"):
        _ = ClientSettings().public_key


def test_a_local_runtime_json_pins_its_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FERRY_APPLIANCE_KEY", raising=False)
    settings = ClientSettings.load(_runtime(tmp_path, KEYS.public.text), appliance_key=None)
    assert settings.public_key == KEYS.public


def test_a_pinned_key_that_differs_from_runtime_json_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = _runtime(tmp_path, KEYS.public.text)
    other = ApplianceKeyPair.generate().public.text
    with pytest.raises(ValueError, match="another appliance key"):
        ClientSettings.load(runtime, appliance_key=other)
    monkeypatch.setenv("FERRY_APPLIANCE_KEY", other)
    with pytest.raises(ValueError, match="another appliance key"):
        ClientSettings.load(runtime, appliance_key=None)
    monkeypatch.setenv("FERRY_APPLIANCE_KEY", KEYS.public.text)
    assert ClientSettings.load(runtime, appliance_key=None).public_key == KEYS.public


def test_ferry_migrate_seals_the_guest_login_to_the_pinned_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    password_file = tmp_path / "pw"
    password_file.write_text("from-a-file-pw\n")
    args = parser().parse_args(
        ["migrate", "vm-0001", "--guest-user", "svc", "--guest-password-file", str(password_file)]
    )
    request = clone_request(args, KEYS.public)
    wire = request.to_wire()
    assert "from-a-file-pw" not in wire and '"svc"' not in wire
    assert request.body.guest_credentials is not None
    login = KEYS.open_login(request.body.guest_credentials.sealed)
    assert (login.username, login.password) == ("svc", "from-a-file-pw")
    monkeypatch.setenv("FERRY_GUEST_PASSWORD", "")
    empty = tmp_path / "empty"
    empty.write_text("")
    args = parser().parse_args(
        ["migrate", "vm-0001", "--guest-user", "svc", "--guest-password-file", str(empty)]
    )
    with pytest.raises(ValueError, match="non-empty"):
        clone_request(args, KEYS.public)
