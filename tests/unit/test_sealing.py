"""Sealer: secrets round-trip under the same token and context, and nowhere else."""

from __future__ import annotations

import base64

import pytest

from appliance.errors import PermanentError, SealBroken
from appliance.sealing import Sealer

TOKEN = b"bus-token-for-sealing"
SECRET = b'{"username": "admin", "password": "pa55-w0rd!"}'


def test_a_sealed_value_opens_with_the_same_token_and_context() -> None:
    sealed = Sealer(TOKEN).seal(SECRET, "m-1")
    assert Sealer(TOKEN).open(sealed, "m-1") == SECRET  # a new Sealer: the key is derived
    assert Sealer(TOKEN).open(Sealer(TOKEN).seal(b"", "m-1"), "m-1") == b""


def test_the_plaintext_is_not_visible_in_the_sealed_text() -> None:
    sealed = Sealer(TOKEN).seal(SECRET, "m-1")
    raw = base64.b64decode(sealed)
    assert b"pa55-w0rd!" not in raw and "pa55-w0rd!" not in sealed


def test_sealing_twice_gives_different_texts() -> None:
    sealer = Sealer(TOKEN)
    first, second = sealer.seal(SECRET, "m-1"), sealer.seal(SECRET, "m-1")
    assert first != second  # a fresh nonce each time
    assert sealer.open(first, "m-1") == sealer.open(second, "m-1") == SECRET


def test_another_context_cannot_open_it() -> None:
    """A sealed value moved to another migration's record does not open there."""
    sealed = Sealer(TOKEN).seal(SECRET, "m-1")
    with pytest.raises(SealBroken) as raised:
        Sealer(TOKEN).open(sealed, "m-2")
    assert raised.value.context == "m-2"
    assert "m-2" in str(raised.value)
    assert b"pa55" not in str(raised.value).encode()


def test_another_token_cannot_open_it() -> None:
    sealed = Sealer(TOKEN).seal(SECRET, "m-1")
    with pytest.raises(SealBroken):
        Sealer(b"a-rotated-bus-token").open(sealed, "m-1")


def test_another_purpose_cannot_open_it() -> None:
    sealed = Sealer(TOKEN).seal(SECRET, "m-1")
    with pytest.raises(SealBroken):
        Sealer(TOKEN, purpose=b"something else").open(sealed, "m-1")


@pytest.mark.parametrize("position", [0, 11, 12, -1])
def test_a_flipped_bit_anywhere_is_detected(position: int) -> None:
    raw = bytearray(base64.b64decode(Sealer(TOKEN).seal(SECRET, "m-1")))
    raw[position] ^= 0x01
    with pytest.raises(SealBroken):
        Sealer(TOKEN).open(base64.b64encode(bytes(raw)).decode(), "m-1")


@pytest.mark.parametrize("garbage", ["", "not base64 at all!", "AAAA", "QUJD" * 3])
def test_garbage_is_a_broken_seal_not_a_crash(garbage: str) -> None:
    with pytest.raises(SealBroken):
        Sealer(TOKEN).open(garbage, "m-1")


def test_a_broken_seal_is_permanent() -> None:
    """Retrying cannot help: the migration's prepare step reports it instead."""
    assert issubclass(SealBroken, PermanentError)
