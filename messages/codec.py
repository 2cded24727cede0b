"""Turning raw queue bodies into messages and back: signing and validation.

``Decoder.decode`` is the one way in. It either returns a validated message or
raises :class:`~messages.errors.MessageError` carrying a code and, when it
could be read, the offending ``correlation_id``. No input makes it raise
anything else. Its checks, in order::

    size, nesting depth (<= MAX_DEPTH, before parsing), JSON object
        -> signature (commands: HMAC with the bus token; events: Ed25519 with the
           pinned appliance key) over the RFC 8785 canonical form
        -> known message type of an accepted kind, schema major version, schema

A failure after the signature checked out is marked ``authenticated``: only
those may be answered with an ErrorResponse carrying the correlation id.
Verification is never optional: a Decoder has the key for what it accepts.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any, TypeVar, Union

from pydantic import Field, TypeAdapter, ValidationError

from messages.commands import COMMANDS, Command
from messages.envelope import SCHEMA_VERSION, Envelope, canonical_json
from messages.errors import ErrorCode, MessageError
from messages.events import EVENTS, Event
from messages.keys import ApplianceKeyPair, AppliancePublicKey

M = TypeVar("M", bound=Envelope)

AnyCommand = Annotated[Union[*COMMANDS], Field(discriminator="message_type")]  # type: ignore[valid-type]
AnyEvent = Annotated[Union[*EVENTS], Field(discriminator="message_type")]  # type: ignore[valid-type]

_COMMAND_TYPES = {cls.model_fields["message_type"].default: cls for cls in COMMANDS}
_EVENT_TYPES = {cls.model_fields["message_type"].default: cls for cls in EVENTS}
MESSAGE_TYPES: dict[str, type[Envelope]] = {**_COMMAND_TYPES, **_EVENT_TYPES}

DEFAULT_MAX_BYTES = 256 * 1024
MAX_DEPTH = 64
"""Deepest nesting of arrays and objects accepted; ours go 6 deep. Checked before parsing,
so no body can make the parser or the canonicaliser recurse without bound."""

_EVENT_SIGNATURE = re.compile(r"^[0-9a-f]{128}$")
_JSON_SPECIALS = re.compile(r'["\\\[\]{}]')


def _as_key(token: str | bytes) -> bytes:
    return token.encode("utf-8") if isinstance(token, str) else token


def _unsigned(document: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in document.items() if key != "signature"}


def signature_of(document: dict[str, Any], token: str | bytes) -> str:
    """HMAC-SHA256 (lowercase hex) over the JCS of ``document`` minus ``signature``."""
    return hmac.new(_as_key(token), canonical_json(_unsigned(document)), hashlib.sha256).hexdigest()


def event_signature_of(document: dict[str, Any], keys: ApplianceKeyPair) -> str:
    """Ed25519 (lowercase hex, 128 characters) over the JCS of ``document`` minus ``signature``."""
    return keys.sign(canonical_json(_unsigned(document))).hex()


def sign(message: M, key: str | bytes | ApplianceKeyPair) -> M:
    """Return ``message`` with its signature set: a command with the bus token, an event
    with the appliance's key pair."""
    document = message.wire_dict()
    if message.KIND == "event":
        if not isinstance(key, ApplianceKeyPair):
            raise TypeError("events are signed with the appliance's key pair, not the bus token")
        signature = event_signature_of(document, key)
    else:
        if isinstance(key, ApplianceKeyPair):
            raise TypeError("commands are signed with the bus token")
        signature = signature_of(document, key)
    return message.model_copy(update={"signature": signature})


def encode(message: Envelope, key: str | bytes | ApplianceKeyPair) -> str:
    """Sign and serialise ``message`` for the wire."""
    return sign(message, key).to_wire()


def body_digest(document: dict[str, Any]) -> str:
    """A stable digest of a message's content, signature excluded: tells a retry from a reuse."""
    return hashlib.sha256(canonical_json(_unsigned(document))).hexdigest()


def check_fresh(sent_at: datetime, now: datetime, max_skew: timedelta, correlation_id: str) -> None:
    """Reject a message sent longer ago (or further ahead) than ``max_skew``."""
    age = now - sent_at
    if age > max_skew:
        raise MessageError(
            ErrorCode.STALE_MESSAGE,
            f"sent {age.total_seconds():.0f}s ago, more than the allowed "
            f"{max_skew.total_seconds():.0f}s",
            correlation_id,
            authenticated=True,
        )
    if -age > max_skew:
        raise MessageError(
            ErrorCode.STALE_MESSAGE,
            f"sent {-age.total_seconds():.0f}s in the future; check the sender's clock",
            correlation_id,
            authenticated=True,
        )


def nesting_depth_exceeds(text: str, limit: int = MAX_DEPTH) -> bool:
    """True if arrays/objects in ``text`` nest deeper than ``limit`` (brackets in strings
    do not count). Linear in the number of brackets, quotes and backslashes."""
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    in_string = False
    escaped_at = -1
    for match in _JSON_SPECIALS.finditer(text):
        at = match.start()
        if at == escaped_at:
            continue
        char = match.group()
        if in_string:
            if char == "\\":
                escaped_at = at + 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _summarise(error: ValidationError) -> str:
    """Pydantic's complaints without the offending values (they may be secrets)."""
    parts = []
    for item in error.errors(include_input=False, include_url=False, include_context=False)[:5]:
        where = ".".join(str(part) for part in item["loc"]) or "message"
        parts.append(f"{where}: {item['msg']}")
    more = error.error_count() - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


@dataclass(frozen=True, slots=True)
class Trust:
    """The keys a receiver checks signatures with: the bus token for commands, the
    appliance's pinned public key for events. A kind without its key never verifies."""

    bus_token: bytes | None = None
    appliance_key: AppliancePublicKey | None = None

    def __post_init__(self) -> None:
        if self.bus_token is not None and not self.bus_token:
            raise ValueError("an empty bus token authenticates nothing")

    def check(self, document: dict[str, Any], kind: str, correlation_id: str | None) -> None:
        signature = document.get("signature")
        if signature is None:
            raise MessageError(ErrorCode.MISSING_SIGNATURE, "message is not signed", correlation_id)
        try:
            canonical = canonical_json(_unsigned(document))
        except (ValueError, TypeError, RecursionError):
            raise MessageError(
                ErrorCode.INVALID_JSON, "message has no RFC 8785 canonical form", correlation_id
            ) from None
        if not isinstance(signature, str) or not self._verifies(kind, canonical, signature):
            raise MessageError(ErrorCode.BAD_SIGNATURE, "signature does not match", correlation_id)

    def _verifies(self, kind: str, canonical: bytes, signature: str) -> bool:
        if kind == "event":
            if self.appliance_key is None or not _EVENT_SIGNATURE.match(signature):
                return False
            return self.appliance_key.verifies(canonical, bytes.fromhex(signature))
        if self.bus_token is None:
            return False
        expected = hmac.new(self.bus_token, canonical, hashlib.sha256).hexdigest()
        return hmac.compare_digest(signature.encode("utf-8", "surrogatepass"), expected.encode())


class Decoder:
    """Parses, authenticates and validates raw bodies of the kinds it accepts.

    ``trust`` is a :class:`Trust`, or the bus token alone (for a receiver of commands).
    """

    def __init__(
        self,
        trust: Trust | str | bytes,
        *,
        accept: Iterable[type[Envelope]] = (Command,),
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self._trust = trust if isinstance(trust, Trust) else Trust(bus_token=_as_key(trust))
        self._accept = tuple(accept)
        self._kinds = {cls.KIND for cls in self._accept}
        self._max_bytes = max_bytes

    def decode(self, raw: str | bytes) -> Envelope:
        document = self.document(raw)
        return self.validate(document)

    def document(self, raw: str | bytes) -> dict[str, Any]:
        """Parse ``raw`` into a JSON object no larger than the limit and at most MAX_DEPTH deep."""
        size = len(raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw)
        try:
            text = raw if isinstance(raw, str) else raw.decode("utf-8")
            if nesting_depth_exceeds(text):
                raise ValueError(f"nested more than {MAX_DEPTH} levels deep")
            document = json.loads(text, parse_constant=_reject_constant)
        except (ValueError, RecursionError, UnicodeDecodeError) as error:
            if size > self._max_bytes:
                raise MessageError(
                    ErrorCode.TOO_LARGE, f"{size} bytes, over the {self._max_bytes} byte limit"
                ) from None
            raise MessageError(ErrorCode.INVALID_JSON, f"not JSON: {error}") from None
        if not isinstance(document, dict):
            raise MessageError(ErrorCode.INVALID_JSON, "not a JSON object")
        if size > self._max_bytes:
            raise MessageError(
                ErrorCode.TOO_LARGE,
                f"{size} bytes, over the {self._max_bytes} byte limit",
                correlation_id_of(document),
            )
        return document

    def validate(self, document: dict[str, Any]) -> Envelope:
        correlation_id = correlation_id_of(document)
        self._trust.check(document, self._kind_of(document, correlation_id), correlation_id)
        try:
            cls = self._message_class(document, correlation_id)
            self._check_version(document, correlation_id)
            try:
                return cls.model_validate(document, context={"wire": True})
            except ValidationError as error:
                raise MessageError(
                    ErrorCode.SCHEMA_VIOLATION, _summarise(error), correlation_id
                ) from None
        except MessageError as error:
            error.authenticated = True
            raise

    def _kind_of(self, document: dict[str, Any], correlation_id: str | None) -> str:
        """Which signature scheme applies: the one kind this decoder accepts, else the
        kind of the named message type."""
        if len(self._kinds) == 1:
            return next(iter(self._kinds))
        message_type = document.get("message_type")
        cls = MESSAGE_TYPES.get(message_type) if isinstance(message_type, str) else None
        if cls is None:
            raise self._unknown(message_type, correlation_id)
        return cls.KIND

    @staticmethod
    def _unknown(message_type: object, correlation_id: str | None) -> MessageError:
        shown = message_type[:64] if isinstance(message_type, str) else type(message_type).__name__
        return MessageError(
            ErrorCode.UNKNOWN_MESSAGE_TYPE, f"unknown message_type {shown!r}", correlation_id
        )

    def _message_class(
        self, document: dict[str, Any], correlation_id: str | None
    ) -> type[Envelope]:
        message_type = document.get("message_type")
        cls = MESSAGE_TYPES.get(message_type) if isinstance(message_type, str) else None
        if cls is None:
            raise self._unknown(message_type, correlation_id)
        if not issubclass(cls, self._accept):
            raise MessageError(
                ErrorCode.NOT_A_COMMAND,
                f"{message_type} is not accepted on this queue",
                correlation_id,
            )
        return cls

    @staticmethod
    def _check_version(document: dict[str, Any], correlation_id: str | None) -> None:
        version = document.get("schema_version", SCHEMA_VERSION)
        major = SCHEMA_VERSION.split(".")[0]
        if not isinstance(version, str) or version.split(".")[0] != major:
            raise MessageError(
                ErrorCode.UNSUPPORTED_SCHEMA_VERSION,
                f"schema_version {str(version)[:16]!r}; this side speaks {major}.x",
                correlation_id,
            )


def correlation_id_of(document: dict[str, Any]) -> str | None:
    value = document.get("correlation_id")
    if isinstance(value, str) and 0 < len(value) <= 128 and value.isprintable():
        return value
    return None


COMMAND_ADAPTER: TypeAdapter[Command] = TypeAdapter(AnyCommand)
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(AnyEvent)
