"""The dead-letter copy of a delivery: whole when SQS can take it, else a truncated prefix.

SQS counts a message's attributes against its size limit, so a body at the
limit (1 MiB) has no room for the attributes a dead-letter copy carries. Such a
copy is a prefix of the body, with the original's size and SHA-256 in its
attributes: enough to recognise the message, and to check a copy kept elsewhere.
"""

from __future__ import annotations

import hashlib

from appliance.dispatch.delivery import Delivery

SQS_MAX_BYTES = 1024 * 1024  # body and attributes of one message
TRUNCATED_BYTES = 200 * 1024  # fits any queue's MaximumMessageSize (256 KiB on older queues)


def sqs_size(body: str, attributes: dict[str, str]) -> int:
    """What SQS counts against its message size limit: body, and attribute names, types, values."""
    size = len(body.encode("utf-8", "surrogatepass"))
    return size + sum(len(n) + len("String") + len(v.encode()) for n, v in attributes.items())


def dead_letter_copy(delivery: Delivery, limit: int) -> tuple[str, dict[str, str]]:
    """The dead-letter copy of ``delivery`` within ``limit`` bytes: whole, or a truncated
    prefix whose attributes name the original's size and SHA-256."""
    body = delivery.body or "(empty)"
    attributes = {
        "ferry_source_message_id": delivery.queue_message_id,
        "ferry_receive_count": str(delivery.receive_count),
    }
    if sqs_size(body, attributes) <= limit:
        return body, attributes
    raw = body.encode("utf-8", "surrogatepass")
    attributes |= {
        "ferry_truncated": "true",
        "ferry_original_bytes": str(len(raw)),
        "ferry_original_sha256": hashlib.sha256(raw).hexdigest(),
    }
    room = min(limit, TRUNCATED_BYTES) - sqs_size("", attributes)
    return raw[:room].decode("utf-8", "ignore") or "(empty)", attributes
