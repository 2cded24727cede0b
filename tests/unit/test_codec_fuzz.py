"""No input crashes the decoder: every rejection is a MessageError with a code."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from messages.codec import MESSAGE_TYPES, Decoder, Trust, encode, event_signature_of, signature_of
from messages.commands import Command
from messages.errors import ErrorCode, MessageError
from messages.events import Event
from messages.examples import EXAMPLE_KEYS, examples

TOKEN = b"fuzz-token"
TRUST = Trust(bus_token=TOKEN, appliance_key=EXAMPLE_KEYS.public)
DECODER = Decoder(TRUST, accept=(Command, Event), max_bytes=4096)
LARGE = Decoder(TRUST, accept=(Command, Event), max_bytes=64 * 1024)
VALID = [
    json.loads(encode(message, EXAMPLE_KEYS if message.KIND == "event" else TOKEN))
    for message in examples()
]


def _resigned(document: dict[str, Any], kind: str) -> str:
    """The mutated document signed again, so the mutation reaches the schema checks."""
    try:
        if kind == "event":
            document["signature"] = event_signature_of(document, EXAMPLE_KEYS)
        else:
            document["signature"] = signature_of(document, TOKEN)
    except ValueError:
        pass  # no canonical form: the decoder must say so
    return json.dumps(document)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=20), children, max_size=5)
    ),
    max_leaves=30,
)


def _decode_or_reject(decoder: Decoder, raw: str | bytes) -> None:
    try:
        decoder.decode(raw)
    except MessageError as error:
        assert isinstance(error.code, ErrorCode)
        assert error.correlation_id is None or len(error.correlation_id) <= 128


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_arbitrary_bytes(raw: bytes) -> None:
    _decode_or_reject(DECODER, raw)


@settings(max_examples=400)
@given(st.text(max_size=600))
def test_arbitrary_text(raw: str) -> None:
    _decode_or_reject(DECODER, raw)


@settings(max_examples=400)
@given(json_values)
def test_arbitrary_json(value: Any) -> None:
    _decode_or_reject(DECODER, json.dumps(value))


@settings(max_examples=600)
@given(st.sampled_from(VALID), st.data())
def test_mutated_valid_messages(document: dict[str, Any], data: st.DataObject) -> None:
    """Replace one field anywhere in a valid message with an arbitrary value."""
    kind = MESSAGE_TYPES[document["message_type"]].KIND
    mutated = json.loads(json.dumps(document))
    target = mutated
    path = []
    while isinstance(target, dict) and target:
        key = data.draw(st.sampled_from(sorted(target)))
        path.append(key)
        if not isinstance(target[key], dict) or data.draw(st.booleans()):
            target[key] = data.draw(json_values)
            break
        target = target[key]
    _decode_or_reject(DECODER, json.dumps(mutated))
    _decode_or_reject(LARGE, _resigned(mutated, kind))
