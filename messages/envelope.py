"""The envelope every message travels in, and its canonical form.

A message on the wire is one JSON object::

    {message_type, message_id, correlation_id, appliance_id, sent_at,
     schema_version, body, signature}

``signature`` covers the canonical form (RFC 8785, JCS) of the object without
its ``signature`` key: on commands a lowercase hex HMAC-SHA256 keyed by the bus
token (64 characters), on events a lowercase hex Ed25519 signature by the
appliance's key (128 characters). See :mod:`messages.codec` and README.md.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar

import rfc8785
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationInfo, model_validator

SCHEMA_VERSION = "1.0"
"""Major.minor. A receiver accepts any minor of its own major."""

WIRE_REQUIRED = ("message_id", "sent_at", "signature")
"""Envelope fields a message read from the wire must carry (the builder fills them here)."""


def new_id() -> str:
    return str(uuid.uuid4())


def utcnow() -> datetime:
    return datetime.now(UTC)


class WireModel(BaseModel):
    """Base of every wire model: immutable, and unknown fields are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def _required_on_the_wire(schema: dict[str, Any]) -> None:
    """The JSON Schema describes the wire, where ids, time and signature are never defaulted."""
    required = list(schema.get("required", []))
    schema["required"] = required + [name for name in WIRE_REQUIRED if name not in required]
    signature = schema.get("properties", {}).get("signature", {})
    signature.pop("default", None)
    for option in signature.pop("anyOf", []):
        if option.get("type") == "string":
            signature.update(option)


class Envelope(WireModel):
    """Fields common to every message; subclasses pin ``message_type`` and ``body``."""

    model_config = ConfigDict(frozen=True, extra="forbid", json_schema_extra=_required_on_the_wire)

    KIND: ClassVar[str] = "message"

    message_type: str
    message_id: str = Field(default_factory=new_id, min_length=1, max_length=128)
    correlation_id: str = Field(default_factory=new_id, min_length=1, max_length=128)
    appliance_id: str | None = Field(default=None, max_length=128)
    sent_at: AwareDatetime = Field(default_factory=utcnow)
    schema_version: str = Field(default=SCHEMA_VERSION, pattern=r"^\d+\.\d+$")
    signature: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="HMAC-SHA256 (lowercase hex) with the bus token over the JCS of the rest",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_defaults_from_the_wire(cls, data: Any, info: ValidationInfo) -> Any:
        """Built here, a message gets a fresh id and time; read from the wire it must
        carry them, signed: defaults there would make a signed message replayable forever."""
        context = info.context if isinstance(info.context, dict) else {}
        if context.get("wire") and isinstance(data, dict):
            missing = [name for name in ("message_id", "sent_at") if data.get(name) is None]
            if missing:
                raise ValueError(f"{' and '.join(missing)} required on the wire")
        return data

    def wire_dict(self) -> dict[str, Any]:
        """The JSON-ready form, secrets revealed: only for putting on the wire."""
        return self.model_dump(mode="json", context={"wire": True})

    def to_wire(self) -> str:
        return json.dumps(self.wire_dict(), separators=(",", ":"), ensure_ascii=False)


def canonical_json(document: dict[str, Any]) -> bytes:
    """RFC 8785 (JCS): the bytes a signature covers, the same in every language.

    Raises ValueError (rfc8785.CanonicalizationError) for what JCS cannot express:
    integers beyond 2**53 - 1, NaN, infinities, strings that are not valid Unicode.
    """
    return rfc8785.dumps(document)
