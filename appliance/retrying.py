"""Retries at the edges, one policy for all of them: jittered exponential backoff, bounded.

Every call to an outside system (SQS, Redis, the NBD link) goes through
:func:`retry`. Errors the caller names transient are retried after a random
wait of up to ``initial_s * 2**n`` seconds (never above ``max_s``), until
``attempts`` tries were made or ``within_s`` seconds were spent; then the
caller's ``give_up`` turns the last error into its own layer's error
(``BusUnavailable``, ``StateStoreUnavailable``, ``TransferFailed``), raised
from that error. Anything else propagates at once. ``sleep`` is injectable so
tests driven by a fake clock do not wait.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    RetryError,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)
from tenacity.stop import stop_base

T = TypeVar("T")
Transient = type[BaseException] | tuple[type[BaseException], ...] | Callable[[BaseException], bool]
"""The errors worth another try: exception types, or a predicate on the error."""
GiveUp = Callable[[BaseException, int], BaseException]
"""Builds the error to raise from the last error and the number of attempts made."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``attempts`` tries in all (and, if set, no new try after ``within_s`` seconds);
    waits grow from ``initial_s`` up to ``max_s``, jittered."""

    attempts: int = 6
    initial_s: float = 0.25
    max_s: float = 8.0
    within_s: float | None = None

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {self.attempts}")


def _is_transient(transient: Transient) -> Callable[[BaseException], bool]:
    if isinstance(transient, type | tuple):
        kinds = transient
        return lambda error: isinstance(error, kinds)
    return transient


async def retry(
    policy: RetryPolicy,
    operation: Callable[[], Awaitable[T]],
    *,
    transient: Transient,
    give_up: GiveUp,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    on_retry: Callable[[BaseException], None] | None = None,
) -> T:
    """Run ``operation``, retrying the errors ``transient`` names under ``policy``."""

    def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        if on_retry is not None and error is not None:
            on_retry(error)

    stop: stop_base = stop_after_attempt(policy.attempts)
    if policy.within_s is not None:
        stop = stop | stop_after_delay(policy.within_s)
    retrying = AsyncRetrying(
        retry=retry_if_exception(_is_transient(transient)),
        wait=wait_random_exponential(multiplier=policy.initial_s, max=policy.max_s),
        stop=stop,
        sleep=sleep,
        before_sleep=before_sleep,
    )
    try:
        async for attempt in retrying:
            with attempt:
                return await operation()
    except RetryError as exhausted:
        last = exhausted.last_attempt
        cause = last.exception() or exhausted
        raise give_up(cause, last.attempt_number) from cause
    raise AssertionError("unreachable: tenacity either returns or raises")
