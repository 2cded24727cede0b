"""Structured logging (structlog) with secrets redacted before anything is written.

Context is bound per message and per job step (``log.bind(message_id=...)``).
A processor masks values whose key looks like a secret, whatever the caller
passed, so a careless ``log.info("x", password=p)`` still writes nothing secret.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog
from pydantic import SecretStr

MASK = "**********"
_SECRET_KEY = re.compile(r"(pass(word)?|secret|token|credential|authorization|api_?key)", re.I)


def _mask(value: Any, key: str = "") -> Any:
    if isinstance(value, SecretStr) or (key and _SECRET_KEY.search(key)):
        return MASK
    if isinstance(value, Mapping):
        return {k: _mask(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_mask(item) for item in value)
    return value


def redact_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: mask secret-looking keys and SecretStr values."""
    for key in list(event_dict):
        if key != "event":
            event_dict[key] = _mask(event_dict[key], key)
    return event_dict


def configure(level: str = "info", fmt: str = "console") -> None:
    """Configure structlog once at process start."""
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(name)
    return logger
