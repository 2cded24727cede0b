"""The dead-letter copy: whole when it fits SQS's limit with its attributes, else truncated."""

from __future__ import annotations

import hashlib

from appliance.dead_letters import SQS_MAX_BYTES, TRUNCATED_BYTES, dead_letter_copy, sqs_size
from appliance.dispatch.delivery import Delivery


def _delivery(body: str) -> Delivery:
    return Delivery("sqs-id-1", "receipt-1", body, 3)


def test_a_body_that_fits_is_copied_whole() -> None:
    body, attributes = dead_letter_copy(_delivery('{"a": 1}'), SQS_MAX_BYTES)
    assert body == '{"a": 1}'
    assert attributes == {"ferry_source_message_id": "sqs-id-1", "ferry_receive_count": "3"}


def test_a_body_of_exactly_one_mib_is_truncated_with_its_size_and_digest() -> None:
    original = "é" + "x" * (SQS_MAX_BYTES - 2)  # 1 MiB exactly, a two-byte character first
    assert len(original.encode()) == SQS_MAX_BYTES
    body, attributes = dead_letter_copy(_delivery(original), SQS_MAX_BYTES)
    assert original.startswith(body) and body.startswith("é")
    assert sqs_size(body, attributes) <= TRUNCATED_BYTES
    assert attributes["ferry_truncated"] == "true"
    assert attributes["ferry_original_bytes"] == str(SQS_MAX_BYTES)
    assert attributes["ferry_original_sha256"] == hashlib.sha256(original.encode()).hexdigest()


def test_a_cut_never_splits_a_character() -> None:
    original = "€" * (SQS_MAX_BYTES // 3 + 1)  # three bytes each
    body, attributes = dead_letter_copy(_delivery(original), SQS_MAX_BYTES)
    assert set(body) == {"€"} and sqs_size(body, attributes) <= TRUNCATED_BYTES


def test_an_empty_body_is_named_so() -> None:
    assert dead_letter_copy(_delivery(""), SQS_MAX_BYTES)[0] == "(empty)"
