"""The health board, the heartbeat monitor's verdicts, and secret redaction in logs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import structlog
from pydantic import SecretStr

from appliance.clock import FakeClock
from appliance.health import HealthBoard
from appliance.logs import MASK, redact_secrets
from clients.monitor import HeartbeatMonitor, Outcome
from messages.events import ComponentState, Heartbeat, HeartbeatBody, ReadyStatus


def test_ready_only_when_every_required_component_is_ok() -> None:
    board = HealthBoard(FakeClock())
    board.register("state_store")
    board.register("bus")
    board.register("optional", required=False)
    assert not board.ready
    board.ok("state_store")
    board.ok("bus")
    assert board.ready
    board.failed("state_store", "unreachable: ConnectionError")
    assert not board.ready
    assert board.details() == ("state_store: unreachable: ConnectionError",)
    board.failed("optional", "down")
    board.ok("state_store")
    assert board.ready


def test_silent_components_expire() -> None:
    clock = FakeClock()
    board = HealthBoard(clock)
    board.register("cloud_cache", timeout_s=120)
    board.ok("cloud_cache")
    clock.advance(119)
    assert board.expire_silent() == []
    clock.advance(2)
    assert board.expire_silent() == ["cloud_cache"]
    assert board.statuses()[0].state is ComponentState.FAILED


async def test_waiters_wake_when_a_component_recovers() -> None:
    board = HealthBoard(FakeClock())
    board.register("state_store")
    waiter = asyncio.create_task(board.wait_ok("state_store"))
    await asyncio.sleep(0)
    assert not waiter.done()
    board.ok("state_store")
    await asyncio.wait_for(waiter, 1)


def _beat(status: ReadyStatus, sequence: int) -> Heartbeat:
    return Heartbeat(
        body=HeartbeatBody(
            status=status,
            appliance_id="a",
            sequence=sequence,
            uptime_s=1,
            version="0",
            appliance_key=f"{'a' * 64}:{'b' * 64}",
        )
    )


async def _stream(*beats: Heartbeat, then_silence: bool = True) -> AsyncIterator[Heartbeat]:
    for beat in beats:
        yield beat
    if then_silence:
        await asyncio.Event().wait()


async def test_monitor_counts_beats_then_stops() -> None:
    seen: list[int] = []
    result = await HeartbeatMonitor(1.0, count=2).watch(
        _stream(*(_beat(ReadyStatus.READY, n) for n in range(5))),
        lambda b: seen.append(b.body.sequence),
    )
    assert result.outcome is Outcome.COUNT_REACHED and result.exit_code == 0
    assert seen == [0, 1]


async def test_monitor_fails_after_missed_beats() -> None:
    result = await HeartbeatMonitor(0.05, max_missed=2).watch(
        _stream(_beat(ReadyStatus.READY, 0)), lambda b: None
    )
    assert result.outcome is Outcome.MISSED and result.exit_code == 3 and result.beats == 1


async def test_monitor_fails_on_not_ready_when_asked() -> None:
    beats = _stream(_beat(ReadyStatus.READY, 0), _beat(ReadyStatus.NOT_READY, 1))
    result = await HeartbeatMonitor(1.0, fail_on_not_ready=True).watch(beats, lambda b: None)
    assert result.outcome is Outcome.NOT_READY and result.exit_code == 4


async def test_monitor_skips_a_heartbeat_delivered_after_a_newer_one() -> None:
    now = datetime.now(UTC)
    late, first, second = (
        _beat(ReadyStatus.READY, n).model_copy(update={"sent_at": now + timedelta(seconds=n)})
        for n in (0, 1, 2)
    )
    seen: list[int] = []
    result = await HeartbeatMonitor(1.0, count=2).watch(
        _stream(first, late, second), lambda b: seen.append(b.body.sequence)
    )
    assert result.outcome is Outcome.COUNT_REACHED
    assert seen == [1, 2]


def test_log_redaction_masks_secret_keys_and_values() -> None:
    event = redact_secrets(
        None,
        "info",
        {
            "event": "x",
            "password": "p",
            "bus_token": "t",
            "nested": {"credentials": {"username": "u"}, "ok": 1},
            "value": SecretStr("s"),
            "plain": "visible",
        },
    )
    assert event["password"] == event["bus_token"] == event["value"] == MASK
    assert event["nested"] == {"credentials": MASK, "ok": 1}
    assert event["plain"] == "visible"


def test_structlog_pipeline_applies_redaction() -> None:
    from appliance import logs

    logs.configure("debug", "json")
    try:
        with structlog.testing.capture_logs(processors=[redact_secrets]) as captured:
            structlog.get_logger("t").info("login", password="hunter2")
        assert captured[0]["password"] == MASK
    finally:
        structlog.reset_defaults()
