"""The envelope every message travels in, and its canonical form.

A message on the wire is one JSON object::

    {message_type, message_id, correlation_id, appliance_id, sent_at,
     schema_version, body, signature}

``signature`` is a lowercase hex HMAC-SHA256 over the canonical JSON of the
object without its ``signature`` key (see :mod:`messages.signing`).
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

SCHEMA_VERSION = "1.0"
"""Major.minor. A receiver accepts any minor of its own major."""


def new_id() -> str:
    return str(uuid.uuid4())


def utcnow() -> datetime:
    return datetime.now(UTC)


class WireModel(BaseModel):
    """Base of every wire model: immutable, and unknown fields are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Envelope(WireModel):
    """Fields common to every message; subclasses pin ``message_type`` and ``body``."""

    KIND: ClassVar[str] = "message"

    message_type: str
    message_id: str = Field(default_factory=new_id, min_length=1, max_length=128)
    correlation_id: str = Field(default_factory=new_id, min_length=1, max_length=128)
    appliance_id: str | None = Field(default=None, max_length=128)
    sent_at: AwareDatetime = Field(default_factory=utcnow)
    schema_version: str = Field(default=SCHEMA_VERSION, pattern=r"^\d+\.\d+$")
    signature: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")

    def wire_dict(self) -> dict[str, Any]:
        """The JSON-ready form, secrets revealed: only for putting on the wire."""
        return self.model_dump(mode="json", context={"wire": True})

    def to_wire(self) -> str:
        return json.dumps(self.wire_dict(), separators=(",", ":"), ensure_ascii=False)


def canonical_json(document: dict[str, Any]) -> bytes:
    """Sorted keys, no whitespace, UTF-8: the bytes a signature covers."""
    return json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")
