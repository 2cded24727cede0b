"""Retries at the edge of the data path: a chunk's I/O against a link that may drop.

Transient data-path errors (ConnectionDropped, TransientDataPathError) are
retried with jittered exponential backoff (tenacity) up to a bound; then
:class:`~appliance.errors.TransferFailed` names the chunk, the attempts and
the cause. Anything else (a permanent error, a bug) propagates at once.
The sleep is the injected clock's, so tests with a fake clock do not wait.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    RetryError,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from appliance.clock import Clock
from appliance.errors import TransferFailed, TransientDataPathError

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``attempts`` tries in all; waits grow from ``initial_s`` up to ``max_s``, jittered."""

    attempts: int = 6
    initial_s: float = 0.25
    max_s: float = 8.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {self.attempts}")


async def with_retries(
    policy: RetryPolicy,
    clock: Clock,
    offset: int,
    length: int,
    operation: Callable[[], Awaitable[T]],
    on_retry: Callable[[BaseException], None] | None = None,
) -> T:
    """Run ``operation`` for the chunk at ``offset`` (+``length``), retrying transient errors."""

    def before_sleep(state: RetryCallState) -> None:
        if on_retry is not None and state.outcome is not None:
            error = state.outcome.exception()
            if error is not None:
                on_retry(error)

    retrying = AsyncRetrying(
        retry=retry_if_exception_type(TransientDataPathError),
        wait=wait_random_exponential(multiplier=policy.initial_s, max=policy.max_s),
        stop=stop_after_attempt(policy.attempts),
        sleep=clock.sleep,
        before_sleep=before_sleep,
    )
    try:
        async for attempt in retrying:
            with attempt:
                return await operation()
    except RetryError as exhausted:
        last = exhausted.last_attempt
        cause = last.exception() or exhausted
        raise TransferFailed(offset, length, last.attempt_number, cause) from cause
    raise AssertionError("unreachable: tenacity either returns or raises")
