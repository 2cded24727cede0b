"""The one retry policy every edge uses: what is retried, how often, and what is raised."""

from __future__ import annotations

import pytest

from appliance.retrying import RetryPolicy, retry


class Exhausted(Exception):
    def __init__(self, cause: BaseException, attempts: int) -> None:
        super().__init__(f"gave up after {attempts}: {cause}")
        self.cause = cause
        self.attempts = attempts


class Flaky:
    """Fails with ``error`` the first ``failures`` calls, then answers ``"ok"``."""

    def __init__(self, failures: int, error: BaseException) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "ok"


class SleepLog:
    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


async def test_transient_errors_are_retried_with_growing_bounded_jittered_waits() -> None:
    operation, sleep = Flaky(4, ConnectionError("reset")), SleepLog()
    seen: list[BaseException] = []
    policy = RetryPolicy(attempts=5, initial_s=1.0, max_s=3.0)
    result = await retry(
        policy, operation, transient=ConnectionError, give_up=Exhausted,
        sleep=sleep, on_retry=seen.append,
    )  # fmt: skip
    assert result == "ok" and operation.calls == 5
    assert len(sleep.waits) == 4 and len(seen) == 4
    assert all(0 <= wait <= bound for wait, bound in zip(sleep.waits, (2, 3, 3, 3), strict=True))


async def test_after_the_last_attempt_give_up_builds_the_error_raised_from_the_cause() -> None:
    error = TimeoutError("no answer")
    operation = Flaky(10, error)
    with pytest.raises(Exhausted) as raised:
        await retry(
            RetryPolicy(attempts=3), operation, transient=(TimeoutError, ConnectionError),
            give_up=Exhausted, sleep=SleepLog(),
        )  # fmt: skip
    assert operation.calls == 3
    assert raised.value.attempts == 3 and raised.value.cause is error
    assert raised.value.__cause__ is error


async def test_other_errors_propagate_at_once() -> None:
    operation = Flaky(1, ValueError("a bug"))
    with pytest.raises(ValueError, match="a bug"):
        await retry(RetryPolicy(), operation, transient=ConnectionError, give_up=Exhausted)
    assert operation.calls == 1


async def test_a_predicate_decides_what_is_transient() -> None:
    busy, broken = Flaky(2, OSError(11, "busy")), Flaky(2, OSError(13, "denied"))

    def transient(error: BaseException) -> bool:
        return isinstance(error, OSError) and error.errno == 11

    kw = {"transient": transient, "give_up": Exhausted, "sleep": SleepLog()}
    assert await retry(RetryPolicy(), busy, **kw) == "ok"  # type: ignore[arg-type]
    with pytest.raises(OSError, match="denied"):
        await retry(RetryPolicy(), broken, **kw)  # type: ignore[arg-type]


async def test_within_s_stops_retrying_once_the_time_is_spent() -> None:
    operation = Flaky(10, ConnectionError("down"))
    with pytest.raises(Exhausted) as raised:
        await retry(
            RetryPolicy(attempts=100, within_s=0.0), operation,
            transient=ConnectionError, give_up=Exhausted, sleep=SleepLog(),
        )  # fmt: skip
    assert raised.value.attempts == operation.calls == 1


def test_a_policy_needs_one_attempt() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        RetryPolicy(attempts=0)
