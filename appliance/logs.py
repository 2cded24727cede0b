"""Structured logging (structlog) with secrets redacted before anything is written.

Context is bound per message and per job step (``log.bind(message_id=...)``).
Two layers of redaction:

* by key: values whose key looks like a secret, and ``SecretStr`` values, are
  masked whatever the caller passed, so ``log.info("x", password=p)`` writes
  nothing secret;
* by value: every *known* secret (the bus token, registered at startup, and
  guest credentials while they are open) is cut out of the rendered line,
  wherever it hides: a message, a field, a key, an exception's text or
  traceback. Values shorter than ``MIN_SECRET_CHARS`` are not registered: they
  would mask ordinary words.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from collections import Counter
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Any, TextIO

import structlog
from pydantic import SecretStr

MASK = "**********"
MIN_SECRET_CHARS = 4
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


def _spellings(value: str) -> set[str]:
    """The ways a value can show up in a rendered line: raw, JSON-escaped, repr-escaped."""
    return {
        value,
        json.dumps(value)[1:-1],
        json.dumps(value, ensure_ascii=False)[1:-1],
        repr(value)[1:-1],
    }


class SecretValues:
    """Values that must never appear in a log line; counted, so nested holders are safe."""

    def __init__(self) -> None:
        self._held: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._pattern: re.Pattern[str] | None = None

    def add(self, value: str) -> None:
        if len(value) < MIN_SECRET_CHARS:
            return
        with self._lock:
            self._held[value] += 1
            self._pattern = None

    def remove(self, value: str) -> None:
        if len(value) < MIN_SECRET_CHARS:
            return
        with self._lock:
            self._held[value] -= 1
            if self._held[value] <= 0:
                del self._held[value]
            self._pattern = None

    def scrub(self, text: str) -> str:
        with self._lock:
            if not self._held:
                return text
            if self._pattern is None:
                spellings = {s for value in self._held for s in _spellings(value) if s}
                ordered = sorted(spellings, key=len, reverse=True)  # longest first
                self._pattern = re.compile("|".join(re.escape(s) for s in ordered))
            pattern = self._pattern
        return pattern.sub(MASK, text)


SECRETS = SecretValues()
"""The process's known secrets: like the logging configuration, one per process."""


def register_secret(value: str) -> None:
    """A secret for the life of the process (the bus token)."""
    SECRETS.add(value)


@contextmanager
def secrets_in_flight(*values: str) -> Iterator[None]:
    """Secrets for the length of a block (opened guest credentials)."""
    for value in values:
        SECRETS.add(value)
    try:
        yield
    finally:
        for value in values:
            SECRETS.remove(value)


class _Scrubbed:
    """Wraps the renderer: whatever it produced loses every known secret value."""

    def __init__(self, renderer: Any, secrets: SecretValues) -> None:
        self._renderer = renderer
        self._secrets = secrets

    def __call__(self, logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> str:
        rendered = self._renderer(logger, method, event_dict)
        return self._secrets.scrub(str(rendered))


def configure(level: str = "info", fmt: str = "console", file: TextIO | None = None) -> None:
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
            _Scrubbed(renderer, SECRETS),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=file or sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(name)
    return logger
