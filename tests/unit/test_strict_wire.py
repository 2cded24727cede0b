"""Wire models validate strictly: no "yes" for true, no "10" for 10, for every message type.

Every boolean and number a message carries is found by walking each example message; each
is replaced by lax look-alikes (which pydantic's default mode would coerce) and the result
must be a schema violation. Commands go through the signed decoder, as the appliance reads
them; event bodies through their models, as a client reads them.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from messages.codec import Decoder, signature_of
from messages.commands import Command
from messages.envelope import Envelope
from messages.errors import ErrorCode, MessageError
from messages.examples import examples

TOKEN = b"strict-token"
Path = tuple[str | int, ...]

LAX = {
    "bool": ["yes", "on", "TRUE", "true", "1", 1, 0, "off", "no", "false"],
    "int": ["20", "0x14", 20.0, True, "20.0"],
    "float": ["20.5", "20", True, "inf"],
}


def _leaves(value: Any, path: Path = ()) -> Iterator[tuple[Path, Any]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _leaves(item, (*path, index))
    else:
        yield path, value


def _with(document: dict[str, Any], path: Path, value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(document)
    target: Any = changed
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return changed


def _valid(model: type[BaseModel], document: dict[str, Any]) -> bool:
    try:
        model.model_validate(document)
    except ValidationError:
        return False
    return True


def _kind(model: type[BaseModel], body: dict[str, Any], path: Path, value: Any) -> str | None:
    """What a leaf holds: a bool, an int, a float, or something else (None)."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "float" if _valid(model, _with(body, path, 20.5)) else "int"
    if isinstance(value, float):
        return "float"
    if value is None:  # an optional field left out: what does it accept?
        if _valid(model, _with(body, path, True)):
            return "bool"
        if _valid(model, _with(body, path, 20.5)):
            return "float"
        if _valid(model, _with(body, path, 20)):
            return "int"
    return None


def _cases(kind: str) -> list[tuple[str, Path, Any]]:
    cases = []
    for message in examples():
        if message.KIND != kind:
            continue
        body = message.wire_dict()["body"]
        model = type(message).model_fields["body"].annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        for path, value in _leaves(body):
            found = _kind(model, body, path, value)
            for lax in LAX.get(found or "", []):
                cases.append((message.message_type, path, lax))
    return cases


COMMAND_CASES = _cases("command")
EVENT_CASES = _cases("event")


def test_every_command_type_with_a_number_or_flag_is_covered() -> None:
    covered = {message_type for message_type, _, _ in COMMAND_CASES}
    assert covered >= {
        "SourceInventoryRequest",
        "SourceCloneRequest",
        "MigrateBackRequest",
        "SetPolicyRequest",
        "ResetRequest",
        "StatusRequest",
    }
    paths = {(t, p) for t, p, _ in COMMAND_CASES}
    assert ("ResetRequest", ("confirm",)) in paths
    assert ("SourceInventoryRequest", ("page_size",)) in paths
    assert ("SourceCloneRequest", ("options", "bandwidth_cap_mbps")) in paths
    assert ("SetPolicyRequest", ("max_concurrent_migrations",)) in paths


def _message(message_type: str) -> Envelope:
    return next(m for m in examples() if m.message_type == message_type)


@pytest.mark.parametrize(("message_type", "path", "lax"), COMMAND_CASES)
def test_a_signed_command_with_a_lax_value_is_a_schema_violation(
    message_type: str, path: Path, lax: Any
) -> None:
    document = _message(message_type).wire_dict()
    document = _with(document, ("body", *path), lax)
    document["signature"] = signature_of(document, TOKEN)
    with pytest.raises(MessageError) as raised:
        Decoder(TOKEN).validate(document)
    assert raised.value.code is ErrorCode.SCHEMA_VIOLATION


@pytest.mark.parametrize(("message_type", "path", "lax"), EVENT_CASES)
def test_an_event_body_with_a_lax_value_is_invalid(message_type: str, path: Path, lax: Any) -> None:
    message = _message(message_type)
    model = type(message).model_fields["body"].annotation
    assert isinstance(model, type) and issubclass(model, BaseModel)
    body = _with(message.wire_dict()["body"], path, lax)
    with pytest.raises(ValidationError):
        model.model_validate(body)


@pytest.mark.parametrize("confirm", ["yes", 1, "on", "TRUE"])
def test_a_reset_confirmed_by_a_lax_value_is_refused(confirm: object) -> None:
    document = _message("ResetRequest").wire_dict()
    document["body"]["confirm"] = confirm
    document["signature"] = signature_of(document, TOKEN)
    with pytest.raises(MessageError) as raised:
        Decoder(TOKEN).validate(document)
    assert raised.value.code is ErrorCode.SCHEMA_VIOLATION
    assert "body.confirm" in raised.value.reason


def test_strict_values_and_json_strings_for_dates_and_enums_still_decode() -> None:
    for message in examples():
        if message.KIND != "command":
            continue
        document = message.wire_dict()
        document["signature"] = signature_of(document, TOKEN)
        decoded = Decoder(TOKEN).validate(document)
        assert isinstance(decoded, Command)
        assert decoded.sent_at == message.sent_at
