"""Known secrets never reach a log line, by value: in the message, a field, a key, a nested
value, an object's repr or an exception's text and traceback."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
import structlog

from appliance import logs

TOKEN = "bus-token-0123456789abcdef"
PASSWORD = 'p@ss "quoted" caf\u00e9'


class Opaque:
    def __repr__(self) -> str:
        return f"Opaque(holding {TOKEN})"


@pytest.fixture(params=["console", "json"])
def output(request: pytest.FixtureRequest) -> Iterator[io.StringIO]:
    out = io.StringIO()
    logs.configure("debug", request.param, file=out)
    logs.register_secret(TOKEN)
    try:
        yield out
    finally:
        logs.SECRETS.remove(TOKEN)
        structlog.reset_defaults()


def test_a_registered_secret_is_cut_from_every_part_of_a_line(output: io.StringIO) -> None:
    log = logs.get_logger("test")
    log.info(f"connecting with {TOKEN}", detail=f"url=sqs://x?t={TOKEN}")
    log.warning("nested", info={"list": [f"a{TOKEN}b"], TOKEN: 1}, thing=Opaque())
    try:
        raise ValueError(f"rejected token {TOKEN}")
    except ValueError:
        log.exception("it failed")
    text = output.getvalue()
    assert TOKEN not in text
    assert text.count(logs.MASK) >= 6
    assert "connecting with" in text and "rejected token" in text and "Traceback" in text


def test_credentials_in_flight_are_cut_while_open_and_only_then(output: io.StringIO) -> None:
    log = logs.get_logger("test")
    with logs.secrets_in_flight("guest-user-x", PASSWORD):
        log.info("prepare", note=f"login guest-user-x / {PASSWORD}")
        try:
            raise RuntimeError(f"guest said no to {PASSWORD!r}")
        except RuntimeError:
            log.exception("prepare failed")
    inside = output.getvalue()
    assert PASSWORD not in inside and "guest-user-x" not in inside
    assert repr(PASSWORD)[1:-1] not in inside  # the escaped spelling too
    log.info("after", note="guest-user-x")
    assert "guest-user-x" in output.getvalue().splitlines()[-1]


def test_short_values_are_not_registered_they_would_mask_words() -> None:
    logs.register_secret("ab")
    assert logs.SECRETS.scrub("a tab") == "a tab"
