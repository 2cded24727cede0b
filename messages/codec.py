"""Turning raw queue bodies into messages and back: signing and validation.

``Decoder.decode`` is the one way in. It either returns a validated message or
raises :class:`~messages.errors.MessageError` carrying a code and, when it
could be read, the offending ``correlation_id``. No input makes it raise
anything else.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Annotated, Any, TypeVar, Union

from pydantic import Field, TypeAdapter, ValidationError

from messages.commands import COMMANDS, Command
from messages.envelope import SCHEMA_VERSION, Envelope, canonical_json
from messages.errors import ErrorCode, MessageError
from messages.events import EVENTS, Event

M = TypeVar("M", bound=Envelope)

AnyCommand = Annotated[Union[*COMMANDS], Field(discriminator="message_type")]  # type: ignore[valid-type]
AnyEvent = Annotated[Union[*EVENTS], Field(discriminator="message_type")]  # type: ignore[valid-type]

_COMMAND_TYPES = {cls.model_fields["message_type"].default: cls for cls in COMMANDS}
_EVENT_TYPES = {cls.model_fields["message_type"].default: cls for cls in EVENTS}
MESSAGE_TYPES: dict[str, type[Envelope]] = {**_COMMAND_TYPES, **_EVENT_TYPES}

DEFAULT_MAX_BYTES = 256 * 1024


def _as_key(token: str | bytes) -> bytes:
    return token.encode("utf-8") if isinstance(token, str) else token


def signature_of(document: dict[str, Any], token: str | bytes) -> str:
    """HMAC-SHA256 (lowercase hex) over the canonical JSON of ``document`` minus ``signature``."""
    unsigned = {key: value for key, value in document.items() if key != "signature"}
    return hmac.new(_as_key(token), canonical_json(unsigned), hashlib.sha256).hexdigest()


def sign(message: M, token: str | bytes) -> M:
    """Return ``message`` with its signature set."""
    document = message.wire_dict()
    return message.model_copy(update={"signature": signature_of(document, token)})


def encode(message: Envelope, token: str | bytes) -> str:
    """Sign and serialise ``message`` for the wire."""
    return sign(message, token).to_wire()


def body_digest(document: dict[str, Any]) -> str:
    """A stable digest of a message's content, signature excluded: tells a retry from a reuse."""
    unsigned = {key: value for key, value in document.items() if key != "signature"}
    return hashlib.sha256(canonical_json(unsigned)).hexdigest()


def check_fresh(sent_at: datetime, now: datetime, max_skew: timedelta, correlation_id: str) -> None:
    """Reject a message sent longer ago (or further ahead) than ``max_skew``."""
    age = now - sent_at
    if age > max_skew:
        raise MessageError(
            ErrorCode.STALE_MESSAGE,
            f"sent {age.total_seconds():.0f}s ago, more than the allowed "
            f"{max_skew.total_seconds():.0f}s",
            correlation_id,
        )
    if -age > max_skew:
        raise MessageError(
            ErrorCode.STALE_MESSAGE,
            f"sent {-age.total_seconds():.0f}s in the future; check the sender's clock",
            correlation_id,
        )


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


class Decoder:
    """Parses, authenticates and validates raw bodies of the kinds it accepts."""

    def __init__(
        self,
        token: str | bytes | None,
        *,
        accept: Iterable[type[Envelope]] = (Command,),
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self._key = _as_key(token) if token is not None else None
        self._accept = tuple(accept)
        self._max_bytes = max_bytes

    def decode(self, raw: str | bytes) -> Envelope:
        document = self.document(raw)
        return self.validate(document)

    def document(self, raw: str | bytes) -> dict[str, Any]:
        """Parse ``raw`` into a JSON object no larger than the limit."""
        size = len(raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw)
        try:
            document = json.loads(raw, parse_constant=_reject_constant)
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
        cls = self._message_class(document, correlation_id)
        self._check_version(document, correlation_id)
        if self._key is not None:
            self._check_signature(document, correlation_id)
        try:
            return cls.model_validate(document)
        except ValidationError as error:
            raise MessageError(
                ErrorCode.SCHEMA_VIOLATION, _summarise(error), correlation_id
            ) from None

    def _message_class(
        self, document: dict[str, Any], correlation_id: str | None
    ) -> type[Envelope]:
        message_type = document.get("message_type")
        cls = MESSAGE_TYPES.get(message_type) if isinstance(message_type, str) else None
        if cls is None:
            shown = (
                message_type[:64] if isinstance(message_type, str) else type(message_type).__name__
            )
            raise MessageError(
                ErrorCode.UNKNOWN_MESSAGE_TYPE, f"unknown message_type {shown!r}", correlation_id
            )
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

    def _check_signature(self, document: dict[str, Any], correlation_id: str | None) -> None:
        assert self._key is not None
        signature = document.get("signature")
        if signature is None:
            raise MessageError(ErrorCode.MISSING_SIGNATURE, "message is not signed", correlation_id)
        try:
            expected = signature_of(document, self._key)
        except (ValueError, TypeError):
            raise MessageError(
                ErrorCode.INVALID_JSON, "message has no canonical form", correlation_id
            ) from None
        if not isinstance(signature, str) or not hmac.compare_digest(
            signature.encode("utf-8", "surrogatepass"), expected.encode()
        ):
            raise MessageError(ErrorCode.BAD_SIGNATURE, "signature does not match", correlation_id)


def correlation_id_of(document: dict[str, Any]) -> str | None:
    value = document.get("correlation_id")
    if isinstance(value, str) and 0 < len(value) <= 128 and value.isprintable():
        return value
    return None


COMMAND_ADAPTER: TypeAdapter[Command] = TypeAdapter(AnyCommand)
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(AnyEvent)
