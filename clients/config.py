"""Where the appliance's queues are and the token to sign with, from FERRY_* or runtime.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class ClientSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FERRY_", frozen=True, extra="ignore")

    sqs_endpoint: str | None = None
    region: str = "us-east-1"
    aws_access_key_id: SecretStr = SecretStr("test")
    aws_secret_access_key: SecretStr = SecretStr("test")
    command_queue: str = "ferry-commands"
    response_queue: str = "ferry-responses"
    bus_token: SecretStr | None = None
    receive_wait_s: int = Field(default=2, ge=0, le=20)

    @classmethod
    def load(cls, runtime_file: Path | None = None, **overrides: Any) -> ClientSettings:
        """FERRY_* settings, with endpoint and queue URLs from a runtime.json when given."""
        values: dict[str, Any] = {}
        if runtime_file is not None:
            runtime = json.loads(runtime_file.read_text())
            values = {
                "sqs_endpoint": runtime["sqs_endpoint"],
                "region": runtime["region"],
                "command_queue": runtime["command_queue_url"],
                "response_queue": runtime["response_queue_url"],
            }
        return cls(**{**values, **overrides})

    @property
    def token(self) -> bytes:
        if self.bus_token is None:
            raise ValueError("set FERRY_BUS_TOKEN (the shared message bus token)")
        return self.bus_token.get_secret_value().encode("utf-8")
