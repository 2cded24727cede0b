"""Envelope rules a forger would probe: ids and time are never defaulted from the wire, and
nesting is bounded before anything recurses."""

from __future__ import annotations

import json

import pytest

from messages import schema
from messages.codec import MAX_DEPTH, Decoder, encode, nesting_depth_exceeds, signature_of
from messages.commands import SourceInventoryRequest
from messages.errors import ErrorCode, MessageError

TOKEN = b"envelope-token"


@pytest.mark.parametrize("missing", [("message_id",), ("sent_at",), ("message_id", "sent_at")])
def test_a_signed_command_without_its_ids_is_a_schema_violation(missing: tuple[str, ...]) -> None:
    document = json.loads(SourceInventoryRequest().to_wire())
    for name in missing:
        del document[name]
    document["signature"] = signature_of(document, TOKEN)
    with pytest.raises(MessageError) as caught:
        Decoder(TOKEN).decode(json.dumps(document))
    assert caught.value.code is ErrorCode.SCHEMA_VIOLATION
    assert caught.value.authenticated
    assert all(name in caught.value.reason for name in missing)


def test_building_a_command_still_fills_its_ids_and_they_are_signed() -> None:
    document = json.loads(encode(SourceInventoryRequest(), TOKEN))
    assert document["message_id"] and document["sent_at"]
    document["message_id"] = "another-id"
    with pytest.raises(MessageError) as caught:
        Decoder(TOKEN).decode(json.dumps(document))
    assert caught.value.code is ErrorCode.BAD_SIGNATURE


def test_the_json_schemas_require_ids_time_and_signature() -> None:
    for name, text in schema.rendered().items():
        required = json.loads(text)["required"]
        assert {"message_id", "sent_at", "signature"} <= set(required), name


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    ("text", "too_deep"),
    [
        (_nested(MAX_DEPTH), False),
        (_nested(MAX_DEPTH + 1), True),
        ('"' + "[" * 500 + '"', False),  # brackets in a string do not nest
        ('["\\"' + "[" * 500 + '"]', False),  # nor after an escaped quote
        ('["\\\\"' + ", [" * 100 + "]" * 100 + "]", True),  # an escaped backslash ends nothing
        ("{" + '"a":{' * 70 + "}" * 71, True),
        ("[" + '{"a": "]]]]"}, ' * 100 + "1]", False),
    ],
)
def test_nesting_is_measured_outside_strings(text: str, too_deep: bool) -> None:
    assert nesting_depth_exceeds(text) is too_deep


def test_a_body_980_levels_deep_is_refused_before_parsing_as_invalid_json() -> None:
    body = '{"correlation_id": "c", "body": ' + _nested(980) + "}"
    with pytest.raises(MessageError) as caught:
        Decoder(TOKEN).decode(body)
    assert caught.value.code is ErrorCode.INVALID_JSON
    assert not caught.value.authenticated
