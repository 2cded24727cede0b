"""Retries at the edge of the data path: a chunk's I/O against a link that may drop.

Transient data-path errors (ConnectionDropped, TransientDataPathError) are
retried under a :class:`~appliance.retrying.RetryPolicy` (jittered exponential
backoff, bounded); then :class:`~appliance.errors.TransferFailed` names the
chunk, the attempts and the cause. Anything else (a permanent error, a bug)
propagates at once. The sleep is the injected clock's, so tests with a fake
clock do not wait.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from appliance.clock import Clock
from appliance.errors import TransferFailed, TransientDataPathError
from appliance.retrying import RetryPolicy, retry

__all__ = ["RetryPolicy", "with_retries"]

T = TypeVar("T")


async def with_retries(
    policy: RetryPolicy,
    clock: Clock,
    offset: int,
    length: int,
    operation: Callable[[], Awaitable[T]],
    on_retry: Callable[[BaseException], None] | None = None,
) -> T:
    """Run ``operation`` for the chunk at ``offset`` (+``length``), retrying transient errors."""

    def give_up(cause: BaseException, attempts: int) -> TransferFailed:
        return TransferFailed(offset, length, attempts, cause)

    return await retry(
        policy,
        operation,
        transient=TransientDataPathError,
        give_up=give_up,
        sleep=clock.sleep,
        on_retry=on_retry,
    )
