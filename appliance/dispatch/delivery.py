"""What the bus hands the dispatcher, and what the dispatcher tells the bus to do with it."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


@dataclass(frozen=True, slots=True)
class Delivery:
    """One received queue message."""

    queue_message_id: str
    receipt_handle: str
    body: str
    receive_count: int


class Verdict(StrEnum):
    """The explicit ack/reject signal for one delivery."""

    ACK = "ack"  # done (or safely recorded): delete it
    RETRY = "retry"  # could not be handled now: leave it for redelivery (backing off)
    BUSY = "busy"  # another delivery is handling it: look again soon, when it may be done
    DEAD_LETTER = "dead_letter"  # can never be handled: copy to the dead-letter queue, delete
