"""The wire protocol: round trips, schema files, signing and the decoder's rejections."""

from __future__ import annotations

import json
from datetime import timedelta

import jsonschema
import pytest
import rfc8785
from pydantic import ValidationError

from messages import schema
from messages.codec import (
    MESSAGE_TYPES,
    Decoder,
    Trust,
    body_digest,
    check_fresh,
    encode,
    sign,
    signature_of,
)
from messages.commands import (
    CloneVm,
    Command,
    GuestCredentials,
    MigrationSelector,
    SourceCloneRequest,
    SourceCloneRequestBody,
    SourceInventoryRequest,
)
from messages.common import MigrationType
from messages.envelope import Envelope, utcnow
from messages.errors import ErrorCode, MessageError
from messages.events import Event, Heartbeat
from messages.examples import EXAMPLE_KEYS, EXAMPLE_SEALED, EXAMPLE_TOKEN, examples
from messages.keys import ApplianceKeyPair

TOKEN = b"unit-test-token"
KEYS = ApplianceKeyPair.generate()
TRUST = Trust(bus_token=TOKEN, appliance_key=KEYS.public)


def _key(message: Envelope) -> bytes | ApplianceKeyPair:
    return KEYS if message.KIND == "event" else TOKEN


def _decode(raw: str | bytes, **kwargs: object) -> Envelope:
    return Decoder(TRUST, accept=(Command, Event), **kwargs).decode(raw)  # type: ignore[arg-type]


def _code(raw: str | bytes, **kwargs: object) -> ErrorCode:
    with pytest.raises(MessageError) as caught:
        _decode(raw, **kwargs)
    return caught.value.code


@pytest.mark.parametrize("message", examples(), ids=lambda m: m.message_type)
def test_every_message_round_trips_through_the_wire(message: Envelope) -> None:
    raw = encode(message, _key(message))
    decoded = _decode(raw)
    assert type(decoded) is type(message)
    assert decoded.wire_dict() == sign(message, _key(message)).wire_dict()


def test_examples_cover_every_message_type() -> None:
    assert {m.message_type for m in examples()} == set(MESSAGE_TYPES)


def test_checked_in_schema_files_match_the_models() -> None:
    assert schema.stale_files() == [], "run `make schema` and commit messages/schema/"


def test_schema_files_validate_the_examples() -> None:
    for message in examples():
        document = json.loads((schema.SCHEMA_DIR / f"{message.message_type}.json").read_text())
        jsonschema.validate(message.wire_dict(), document)


def _clone(password: str = "hunter2") -> SourceCloneRequest:
    return SourceCloneRequest(
        body=SourceCloneRequestBody(
            vms=(CloneVm(name="a"),),
            migration_type=MigrationType.COLD,
            guest_credentials=GuestCredentials(sealed=KEYS.public.seal_login("root", password)),
        )
    )


def test_guest_credentials_travel_sealed_only() -> None:
    message = _clone()
    wire = encode(message, TOKEN)
    assert "hunter2" not in wire and "root" not in json.loads(wire)["body"]["guest_credentials"]
    decoded = _decode(wire)
    assert isinstance(decoded, SourceCloneRequest)
    assert decoded.body.guest_credentials is not None
    login = KEYS.open_login(decoded.body.guest_credentials.sealed)
    assert (login.username, login.password) == ("root", "hunter2")


def test_the_example_sealed_credentials_open_with_the_example_key() -> None:
    login = EXAMPLE_KEYS.open_login(EXAMPLE_SEALED)
    assert (login.username, login.password) == ("admin", "s3cret")


def test_a_good_signature_verifies_with_any_key_order_and_spacing() -> None:
    document = json.loads(encode(SourceInventoryRequest(), TOKEN))
    reordered = json.dumps(dict(reversed(list(document.items()))), indent=4)
    assert isinstance(_decode(reordered), SourceInventoryRequest)


def test_signatures_follow_the_documented_canonical_form() -> None:
    """A client in another language computes exactly this (see messages/README.md)."""
    import hashlib
    import hmac

    document = json.loads(encode(SourceInventoryRequest(), TOKEN))
    unsigned = {k: v for k, v in document.items() if k != "signature"}
    expected = hmac.new(TOKEN, rfc8785.dumps(unsigned), hashlib.sha256).hexdigest()
    assert document["signature"] == expected


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("body", "page_size"), 99),
        (("correlation_id",), "someone-else"),
        (("sent_at",), "2030-01-01T00:00:00Z"),
        (("message_type",), "SourceInventoryRequest"),  # unchanged: control case below
    ],
)
def test_tampering_with_any_field_breaks_the_signature(
    path: tuple[str, ...], value: object
) -> None:
    document = json.loads(encode(SourceInventoryRequest(), TOKEN))
    target = document
    for key in path[:-1]:
        target = target[key]
    changed = target[path[-1]] != value
    target[path[-1]] = value
    if changed:
        assert _code(json.dumps(document)) is ErrorCode.BAD_SIGNATURE
    else:
        assert isinstance(_decode(json.dumps(document)), SourceInventoryRequest)


def test_a_message_signed_with_another_token_is_rejected() -> None:
    raw = encode(SourceInventoryRequest(), b"another-token")
    assert _code(raw) is ErrorCode.BAD_SIGNATURE


def test_an_unsigned_message_is_rejected_with_its_correlation_id() -> None:
    message = SourceInventoryRequest()
    with pytest.raises(MessageError) as caught:
        _decode(message.to_wire())
    assert caught.value.code is ErrorCode.MISSING_SIGNATURE
    assert caught.value.correlation_id == message.correlation_id


def test_stale_and_future_messages_are_rejected() -> None:
    now = utcnow()
    skew = timedelta(minutes=5)
    check_fresh(now - timedelta(minutes=4), now, skew, "c")
    for sent_at in (now - timedelta(minutes=6), now + timedelta(minutes=6)):
        with pytest.raises(MessageError) as caught:
            check_fresh(sent_at, now, skew, "c")
        assert caught.value.code is ErrorCode.STALE_MESSAGE


def test_a_replay_has_the_same_digest_and_a_changed_command_does_not() -> None:
    """The dispatcher tells a redelivery (same digest) from a reused message id by this."""
    message = SourceInventoryRequest()
    first = json.loads(encode(message, TOKEN))
    replay = json.loads(encode(message, TOKEN))
    changed = json.loads(
        encode(
            message.model_copy(update={"body": message.body.model_copy(update={"page_size": 7})}),
            TOKEN,
        )
    )
    assert body_digest(first) == body_digest(replay)
    assert body_digest(first) != body_digest(changed)


def test_oversized_bodies_are_rejected_but_keep_their_correlation_id() -> None:
    message = SourceInventoryRequest()
    document = json.loads(encode(message, TOKEN))
    document["padding"] = "x" * 300_000
    with pytest.raises(MessageError) as caught:
        _decode(json.dumps(document))
    assert caught.value.code is ErrorCode.TOO_LARGE
    assert caught.value.correlation_id == message.correlation_id


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("", ErrorCode.INVALID_JSON),
        ("{", ErrorCode.INVALID_JSON),
        ("[1, 2]", ErrorCode.INVALID_JSON),
        ('{"a": NaN}', ErrorCode.INVALID_JSON),
        (b"\xff\xfe", ErrorCode.INVALID_JSON),
        ("{}", ErrorCode.UNKNOWN_MESSAGE_TYPE),
        ('{"message_type": "DropTables"}', ErrorCode.UNKNOWN_MESSAGE_TYPE),
        ('{"message_type": ["x"]}', ErrorCode.UNKNOWN_MESSAGE_TYPE),
    ],
)
def test_unusable_bodies_get_a_precise_code(raw: str | bytes, code: ErrorCode) -> None:
    assert _code(raw) is code


def test_schema_violations_name_the_field_without_echoing_its_value() -> None:
    document = json.loads(encode(_clone("topsecret"), TOKEN))
    document["body"]["migration_type"] = "teleport"
    document["body"]["vms"][0]["name"] = "topsecret"
    document["body"]["vms"][0]["vm_id"] = "topsecret"
    document["signature"] = signature_of(document, TOKEN)
    with pytest.raises(MessageError) as caught:
        Decoder(TOKEN).decode(json.dumps(document))
    assert caught.value.code is ErrorCode.SCHEMA_VIOLATION
    assert caught.value.authenticated
    assert "migration_type" in caught.value.reason
    assert "topsecret" not in caught.value.reason


def test_an_event_on_the_command_queue_is_not_a_command() -> None:
    heartbeat = next(m for m in examples() if isinstance(m, Heartbeat))
    decoder = Decoder(EXAMPLE_TOKEN)
    with pytest.raises(MessageError) as caught:
        decoder.decode(heartbeat.to_wire())  # Ed25519-signed: no command signature
    assert caught.value.code is ErrorCode.BAD_SIGNATURE
    assert not caught.value.authenticated
    document = heartbeat.wire_dict()
    document["signature"] = signature_of(document, EXAMPLE_TOKEN)  # a token holder's event
    with pytest.raises(MessageError) as caught:
        decoder.decode(json.dumps(document))
    assert caught.value.code is ErrorCode.NOT_A_COMMAND
    assert caught.value.authenticated


def test_another_major_schema_version_is_refused() -> None:
    document = json.loads(encode(SourceInventoryRequest(), TOKEN))
    document["schema_version"] = "2.0"
    document["signature"] = signature_of(document, TOKEN)
    assert _code(json.dumps(document)) is ErrorCode.UNSUPPORTED_SCHEMA_VERSION


def test_a_selector_must_select_something() -> None:
    with pytest.raises(ValidationError):
        MigrationSelector()


def test_wire_models_are_frozen_and_forbid_unknown_fields() -> None:
    message = SourceInventoryRequest()
    with pytest.raises(ValidationError):
        message.message_id = "x"  # type: ignore[misc]
    document = json.loads(message.to_wire())
    document["body"]["surprise"] = 1
    document["signature"] = signature_of(document, TOKEN)
    with pytest.raises(MessageError) as caught:
        Decoder(TOKEN).decode(json.dumps(document))
    assert caught.value.code is ErrorCode.SCHEMA_VIOLATION


def test_protocol_document_examples_are_current_and_verify() -> None:
    from pathlib import Path

    from messages.examples import markdown

    readme = (Path(__file__).parents[2] / "messages" / "README.md").read_text()
    assert readme.endswith((markdown() + "\n", markdown())), (
        "messages/README.md examples are stale: regenerate with python -m messages.examples"
    )
    decoder = Decoder(
        Trust(bus_token=EXAMPLE_TOKEN.encode(), appliance_key=EXAMPLE_KEYS.public),
        accept=(Command, Event),
    )
    for message in examples():
        assert decoder.decode(message.to_wire()).message_type == message.message_type
