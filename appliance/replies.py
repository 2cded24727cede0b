"""Where an answer goes: a command's ``reply_to``, checked, or the shared response queue.

A client may name its own reply queue so that several clients share one
appliance without reading each other's answers. The name comes from a signed
command, but the appliance still only sends to a queue it can find in its own
account on its own endpoint: a name is looked up there (``GetQueueUrl``); a URL
must share the response queue's endpoint and account path, and its name is
looked up the same way. A reply queue's name starts with the response queue's
name and a dash (``ferry-responses-reply-1f2e``), so answers never land in
another application's queue, and permissions can be granted by prefix; the
command and dead-letter queues are never reply queues. An unusable
``reply_to`` falls back to the shared response queue and is logged; lookups
are cached (failures for a minute, so a deleted reply queue is noticed again
later without a lookup per progress message).
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from appliance.logs import get_logger
from messages.commands import REPLY_TO_PATTERN

log = get_logger(__name__)
Lookup = Callable[[str], Awaitable[str | None]]
"""A queue's URL in our own account, by name; None when there is no such queue."""

UNUSABLE_FOR_S = 60.0
CACHED = 1024
_PATTERN = re.compile(REPLY_TO_PATTERN)


@dataclass(frozen=True, slots=True)
class OwnQueues:
    responses: str
    forbidden: frozenset[str]  # the command and dead-letter queues


def _prefix(url: str) -> str:
    return url.rsplit("/", 1)[0]


class ReplyQueues:
    def __init__(self, own: OwnQueues, lookup: Lookup, clock: Callable[[], float] = time.monotonic):
        self._own = own
        self._lookup = lookup
        self._clock = clock
        self._found: OrderedDict[str, str] = OrderedDict()
        self._unusable: dict[str, float] = {}

    async def destination(self, reply_to: str | None) -> str:
        """The URL to send an answer to: ``reply_to``'s queue when usable, else the shared one."""
        if reply_to is None:
            return self._own.responses
        if reply_to in self._found:
            self._found.move_to_end(reply_to)
            return self._found[reply_to]
        until = self._unusable.get(reply_to)
        if until is not None and until > self._clock():
            return self._own.responses
        reason = self._refusal(reply_to)
        url = None if reason else await self._lookup(reply_to.rsplit("/", 1)[-1])
        if reason is None and url is None:
            reason = "no such queue in this account"
        if reason is None and url in self._own.forbidden:
            reason = "the command and dead-letter queues take no answers"
        if reason is not None or url is None:
            self.unusable(reply_to, reason or "unusable")
            return self._own.responses
        self._found[reply_to] = url
        while len(self._found) > CACHED:
            self._found.popitem(last=False)
        return url

    def unusable(self, reply_to: str, reason: str) -> None:
        """Stop sending to ``reply_to`` for a while (it was refused, or the queue is gone)."""
        self._found.pop(reply_to, None)
        if len(self._unusable) >= CACHED:
            now = self._clock()
            self._unusable = {k: v for k, v in self._unusable.items() if v > now}
        self._unusable[reply_to] = self._clock() + UNUSABLE_FOR_S
        log.warning(
            "reply_to unusable; answering on the shared response queue",
            reply_to=reply_to,
            reason=reason,
        )

    def _refusal(self, reply_to: str) -> str | None:
        if _PATTERN.fullmatch(reply_to) is None:
            return "not a queue name or URL"
        if "/" in reply_to and _prefix(reply_to) != _prefix(self._own.responses):
            return "not a queue of this appliance's account and endpoint"
        shared = self._own.responses.rsplit("/", 1)[-1]
        if not reply_to.rsplit("/", 1)[-1].startswith(f"{shared}-"):
            return f"a reply queue's name starts with {shared}-"
        return None
