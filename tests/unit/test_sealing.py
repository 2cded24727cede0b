"""Sealed guest credentials: a client seals to the appliance's public key; only its key pair
opens them, and what opens must be usable credentials."""

from __future__ import annotations

import base64
import json

import pytest

from appliance import logs
from appliance.errors import CommandRejected, InvalidCredentials
from appliance.sealing import Sealer
from messages.errors import ErrorCode
from messages.keys import ApplianceKeyPair, AppliancePublicKey, KeyFormatError

KEYS = ApplianceKeyPair.generate()
USERNAME = "svc-migrate"
PASSWORD = "pa55-w0rd!-\u00e9\u2615"


def test_a_box_sealed_to_the_public_key_opens_with_the_key_pair_only() -> None:
    sealed = KEYS.public.seal_login(USERNAME, PASSWORD)
    with Sealer(KEYS).opened(sealed) as login:
        assert (login.username, login.password) == (USERNAME, PASSWORD)
        assert PASSWORD not in repr(login) and USERNAME not in repr(login)
    with pytest.raises(InvalidCredentials) as raised:
        Sealer(ApplianceKeyPair.generate()).check(sealed)
    assert raised.value.code is ErrorCode.INVALID_CREDENTIALS
    assert isinstance(raised.value, CommandRejected)  # a request error, never "internal"


def test_the_public_key_text_round_trips_and_the_parser_is_strict() -> None:
    text = KEYS.public.text
    assert AppliancePublicKey.parse(text) == KEYS.public
    assert len(text) == 129 and text[64] == ":"
    for bad in ("", text[:-1], text.upper(), text.replace(":", "."), text + "00"):
        with pytest.raises(KeyFormatError):
            AppliancePublicKey.parse(bad)


def test_the_key_file_round_trips_and_refuses_a_mismatched_public_half() -> None:
    again = ApplianceKeyPair.from_json(KEYS.to_json())
    assert again.public == KEYS.public
    document = json.loads(KEYS.to_json())
    document["public"] = ApplianceKeyPair.generate().public.text
    with pytest.raises(KeyFormatError):
        ApplianceKeyPair.from_json(json.dumps(document))


def test_sealing_twice_gives_different_texts() -> None:
    first = KEYS.public.seal_login(USERNAME, PASSWORD)
    second = KEYS.public.seal_login(USERNAME, PASSWORD)
    assert first != second
    assert PASSWORD.encode() not in base64.b64decode(first)


@pytest.mark.parametrize(
    "sealed",
    [
        "not base64 at all!",
        base64.b64encode(b"\x00" * 80).decode(),
        "",
    ],
)
def test_garbage_is_invalid_credentials(sealed: str) -> None:
    with pytest.raises(InvalidCredentials):
        Sealer(KEYS).check(sealed)


def test_a_flipped_bit_is_invalid_credentials() -> None:
    raw = bytearray(base64.b64decode(KEYS.public.seal_login(USERNAME, PASSWORD)))
    raw[-1] ^= 1
    with pytest.raises(InvalidCredentials):
        Sealer(KEYS).check(base64.b64encode(bytes(raw)).decode())


def test_open_credentials_are_registered_for_redaction_then_forgotten() -> None:
    sealed = KEYS.public.seal_login(USERNAME, PASSWORD)
    with Sealer(KEYS).opened(sealed):
        assert logs.SECRETS.scrub(f"x {PASSWORD} y") == f"x {logs.MASK} y"
        assert logs.SECRETS.scrub(f"user {USERNAME}") == f"user {logs.MASK}"
    assert logs.SECRETS.scrub(f"x {PASSWORD} y") == f"x {PASSWORD} y"


def test_the_client_refuses_to_seal_empty_credentials() -> None:
    from messages.keys import CannotOpen

    for username, password in ((USERNAME, ""), ("", PASSWORD)):
        with pytest.raises(CannotOpen):
            KEYS.public.seal_login(username, password)
