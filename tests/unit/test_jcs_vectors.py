"""The test vectors in messages/README.md are right: checked here with independent code
(rfc8785, hmac, PyNaCl), not with the codec that printed them."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from nacl.signing import SigningKey

from messages.codec import Decoder, Trust
from messages.envelope import canonical_json
from messages.errors import ErrorCode, MessageError

README = Path(__file__).parents[2] / "messages" / "README.md"
TOKEN = b"example-token"
SIGNING = SigningKey(hashlib.sha256(b"ferry example ed25519 seed").digest())


def _vectors() -> list[dict[str, Any]]:
    text = README.read_text()
    section = text[text.index("### Test vectors") :]
    block = re.search(r"```json\n(.*?)\n```", section, re.S)
    assert block is not None, "no vector block under '### Test vectors'"
    vectors: list[dict[str, Any]] = json.loads(block.group(1))
    return vectors


def test_the_readme_has_vectors_for_floats_non_ascii_and_large_integers() -> None:
    inputs = " ".join(vector["input"] for vector in _vectors())
    assert "1e21" in inputs and "9007199254740991" in inputs and "\\ud83d" in inputs


@pytest.mark.parametrize("vector", _vectors(), ids=lambda v: v["canonical"][:24])
def test_a_vector_canonicalises_and_signs_as_documented(vector: dict[str, Any]) -> None:
    parsed = json.loads(vector["input"])
    canonical = vector["canonical"].encode("utf-8")
    assert rfc8785.dumps(parsed) == canonical
    assert canonical_json(parsed) == canonical  # the codec agrees with the library
    assert hmac.new(TOKEN, canonical, hashlib.sha256).hexdigest() == vector["hmac_sha256"]
    assert SIGNING.sign(canonical).signature.hex() == vector["ed25519"]  # Ed25519 is deterministic


def test_the_documented_public_key_is_the_example_key() -> None:
    assert bytes(SIGNING.verify_key).hex() in README.read_text()


def test_an_integer_beyond_two_to_the_53_has_no_canonical_form() -> None:
    document = {
        "message_type": "SourceInventoryRequest",
        "message_id": "m",
        "sent_at": "2026-01-01T00:00:00Z",
        "body": {"page_size": 9007199254740993},
        "signature": "0" * 64,
    }
    with pytest.raises(MessageError) as caught:
        Decoder(Trust(bus_token=TOKEN)).decode(json.dumps(document))
    assert caught.value.code is ErrorCode.INVALID_JSON
