"""Where the appliance's queues are, the token to sign with and the appliance key to trust,
from FERRY_* settings or a local appliance's runtime.json.

No pinned appliance key, no client: every event is verified against it
(``FERRY_APPLIANCE_KEY`` / ``ferry --appliance-key``; ``ferry-appliance keys show``
prints it). The one exception is a ``runtime.json`` (``ferry --runtime``): a
local appliance's own file in its data directory, whose ``appliance_key`` is
pinned for the session, and refused if it differs from a key pinned explicitly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from messages.keys import AppliancePublicKey

NO_KEY = (
    "no appliance key pinned: set FERRY_APPLIANCE_KEY or pass --appliance-key "
    "(`ferry-appliance keys show` prints it), or --runtime for a local appliance"
)


class ClientSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FERRY_", frozen=True, extra="ignore")

    sqs_endpoint: str | None = None
    region: str = "us-east-1"
    aws_access_key_id: SecretStr = SecretStr("test")
    aws_secret_access_key: SecretStr = SecretStr("test")
    command_queue: str = "ferry-commands"
    response_queue: str = "ferry-responses"
    bus_token: SecretStr | None = None
    appliance_key: str | None = Field(
        default=None, description="the appliance's public key, '<ed25519 hex>:<x25519 hex>'"
    )
    receive_wait_s: int = Field(default=2, ge=0, le=20)

    @classmethod
    def load(cls, runtime_file: Path | None = None, **overrides: Any) -> ClientSettings:
        """FERRY_* settings, with endpoint, queue URLs and key from a runtime.json when given."""
        given = {name: value for name, value in overrides.items() if value is not None}
        values: dict[str, Any] = {}
        if runtime_file is not None:
            runtime = json.loads(runtime_file.read_text())
            values = {
                "sqs_endpoint": runtime["sqs_endpoint"],
                "region": runtime["region"],
                "command_queue": runtime["command_queue_url"],
                "response_queue": runtime["response_queue_url"],
            }
            pinned = cls(**given).appliance_key  # --appliance-key, else FERRY_APPLIANCE_KEY
            published = runtime.get("appliance_key")
            if pinned and published and pinned.strip() != published:
                raise ValueError(
                    f"{runtime_file} names another appliance key than the one pinned: "
                    "is it the appliance you meant?"
                )
            values["appliance_key"] = pinned or published
        return cls(**{**values, **given})

    @property
    def token(self) -> bytes:
        if self.bus_token is None:
            raise ValueError("set FERRY_BUS_TOKEN (the shared message bus token)")
        return self.bus_token.get_secret_value().encode("utf-8")

    @property
    def public_key(self) -> AppliancePublicKey:
        """The pinned appliance key; ValueError if none is pinned or it is malformed."""
        if not self.appliance_key:
            raise ValueError(NO_KEY)
        return AppliancePublicKey.parse(self.appliance_key)
