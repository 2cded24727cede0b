"""The dispatcher: one delivery in, one verdict out, and at most one answer per command.

Order of checks for each delivery (each failure is final for that delivery)::

    parse (size, JSON)  ->  validate (type, version, signature, schema)
        -> claim the message id in Redis (idempotency; first delivery wins;
           a duplicate arriving while the first is handled waits its turn)
        -> freshness (only for a first delivery: a redelivery of a recorded
           command is never "stale"; a stale first delivery is recorded as
           refused, atomically with its claim, so every later delivery of it is
           refused too)
        -> route to the handler -> publish the answer -> mark answered -> ack

A message that can never be handled is dead-lettered; it gets an ErrorResponse
only when its signature checked out and its correlation id can be read. A
command whose handler hit a transient failure (Redis down) is left on the queue
for redelivery; its record says "received", so the redelivery handles it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import structlog

from appliance.clock import Clock
from appliance.dispatch.delivery import Delivery, Verdict
from appliance.dispatch.reply import error_for, error_response
from appliance.errors import CommandRejected, FerryError, PermanentError, TransientError
from appliance.logs import get_logger
from appliance.sink import EventSink
from appliance.state.commands import Claim, ClaimResult, CommandRecords, Refusal
from appliance.state.events import EventLog
from messages.codec import Decoder, body_digest, check_fresh
from messages.commands import Command
from messages.errors import ErrorCode, MessageError
from messages.events import Event

CommandHandler = Callable[[Command], Awaitable[Sequence[Event]]]
log = get_logger(__name__)
MAX_KEEP_S = 10 * 366 * 24 * 3600  # how long a refusal of a far-future command is remembered


class Dispatcher:
    def __init__(
        self,
        *,
        appliance_id: str,
        decoder: Decoder,
        records: CommandRecords,
        events: EventLog,
        sink: EventSink,
        handlers: Mapping[str, CommandHandler],
        clock: Clock,
        max_skew: timedelta,
    ) -> None:
        self._appliance_id = appliance_id
        self._decoder = decoder
        self._records = records
        self._events = events
        self._sink = sink
        self._handlers = handlers
        self._clock = clock
        self._max_skew = max_skew
        self.in_flight = 0

    async def handle(self, delivery: Delivery) -> Verdict:
        self.in_flight += 1
        structlog.contextvars.bind_contextvars(queue_message_id=delivery.queue_message_id)
        try:
            return await self._handle(delivery)
        finally:
            self.in_flight -= 1
            structlog.contextvars.unbind_contextvars(
                "queue_message_id", "message_id", "correlation_id", "message_type"
            )

    async def _handle(self, delivery: Delivery) -> Verdict:
        try:
            document = self._decoder.document(delivery.body)
        except MessageError as error:
            return await self._reject(error, authenticated=error.authenticated)
        try:
            message = self._decoder.validate(document)
        except MessageError as error:
            return await self._reject(
                error,
                authenticated=error.authenticated,
                reply_to=_authentic_reply_to(error, document),
            )
        assert isinstance(message, Command)
        structlog.contextvars.bind_contextvars(
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            message_type=message.message_type,
        )
        try:
            return await self._claimed(message, body_digest(document))
        except MessageError as error:
            return await self._reject(error, authenticated=True, reply_to=message.reply_to)
        except TransientError as error:
            log.warning("command left for redelivery", reason=str(error))
            return Verdict.RETRY
        except Exception as error:
            # A defect, not an input problem: answer it, keep the message for a post-mortem.
            log.exception("command handler failed unexpectedly")
            await self._sink.publish(
                error_for(
                    self._appliance_id,
                    message,
                    ErrorCode.INTERNAL,
                    f"internal error while handling {message.message_type}: {type(error).__name__}",
                ),
                message.reply_to,
            )
            return Verdict.DEAD_LETTER

    async def _claimed(self, command: Command, digest: str) -> Verdict:
        claim = await self._records.claim(
            command.message_id,
            digest,
            command.message_type,
            command.correlation_id,
            self._clock.now().isoformat(),
            refusal=self._staleness(command),
        )
        match claim.result:
            case ClaimResult.REUSED:
                raise MessageError(
                    ErrorCode.MESSAGE_ID_REUSED,
                    f"message_id {command.message_id} was already used for a different command",
                    command.correlation_id,
                )
            case ClaimResult.REFUSED:
                # Refused for good when first seen (stale): a resend or a redrive is too.
                assert claim.refusal is not None
                raise MessageError(
                    ErrorCode(claim.refusal.code), claim.refusal.reason, command.correlation_id
                )
            case ClaimResult.ANSWERED:
                log.info("duplicate delivery dropped: already answered")
                return Verdict.ACK
            case ClaimResult.BUSY:
                log.info("duplicate delivery while the command is being handled: later")
                return Verdict.BUSY
            case ClaimResult.TAKEOVER:
                log.info("redelivery of a recorded, unanswered command: handling it")
            case ClaimResult.FIRST:
                pass  # fresh: a stale first delivery is recorded as REFUSED
        keeper = asyncio.create_task(self._keep_claim(command.message_id, claim))
        try:
            await self._act(command)
        except asyncio.CancelledError:
            with contextlib.suppress(TransientError):
                await asyncio.shield(self._records.release(command.message_id, claim))
            raise
        finally:
            keeper.cancel()
        return Verdict.ACK

    def _staleness(self, command: Command) -> Refusal | None:
        """Why a first delivery may not act (it is stale), or None; only a first delivery is
        judged: a redelivery of a recorded command is never "stale"."""
        now = self._clock.now()
        try:
            check_fresh(command.sent_at, now, self._max_skew, command.correlation_id)
        except MessageError as error:
            # Sent ahead of time: remember the refusal past the moment it would look fresh.
            ahead = (command.sent_at - now + self._max_skew).total_seconds() + 60
            return Refusal(error.code.value, error.reason, int(min(max(ahead, 0), MAX_KEEP_S)))
        return None

    async def _keep_claim(self, message_id: str, claim: Claim) -> None:
        """Renew the (short) handling lease while the command is acted on."""
        while True:
            await asyncio.sleep(max(self._records.lease_s / 3, 0.05))
            try:
                if not await self._records.renew(message_id, claim):
                    return
            except TransientError as error:
                log.warning("could not renew the command's handling lease", error=str(error))
            except Exception:  # a defect: say so here, never as an unretrieved task error
                log.exception("renewing the command's handling lease failed")
                return

    async def _act(self, command: Command) -> None:
        answer = await self._answer(command)
        await self._events.append(
            "command",
            self._clock.now().isoformat(),
            message_type=command.message_type,
            message_id=command.message_id,
            correlation_id=command.correlation_id,
            answers=[event.message_type for event in answer],
        )
        for event in answer:
            await self._sink.publish(event, command.reply_to)
        await self._records.answered(command.message_id, self._clock.now().isoformat())
        log.info("command answered", answers=[event.message_type for event in answer])

    async def _answer(self, command: Command) -> Sequence[Event]:
        handler = self._handlers.get(command.message_type)
        if handler is None:
            return [
                error_for(
                    self._appliance_id,
                    command,
                    ErrorCode.NOT_IMPLEMENTED,
                    f"{command.message_type} is not supported by this appliance yet",
                )
            ]
        try:
            return await handler(command)
        except CommandRejected as error:
            log.info("command rejected", code=error.code.value, reason=str(error))
            return [error_for(self._appliance_id, command, error.code, str(error))]
        except TransientError:
            raise
        except PermanentError as error:
            log.warning("command failed", error=str(error), error_type=type(error).__name__)
            return [error_for(self._appliance_id, command, error.code, str(error))]
        except FerryError as error:  # pragma: no cover - every FerryError is one of the two
            raise AssertionError(f"unclassified error {type(error).__name__}") from error

    async def _reject(
        self, error: MessageError, *, authenticated: bool, reply_to: str | None = None
    ) -> Verdict:
        """Answer a message that can never be handled, then dead-letter it.

        Only an authenticated one is answered: a signed ErrorResponse carrying the
        correlation id of a message anyone could have written would let a forger fail
        another client's pending request. The rest are logged and dead-lettered."""
        log.warning(
            "message rejected",
            code=error.code.value,
            reason=error.reason,
            authenticated=authenticated,
            correlation_id=error.correlation_id,
        )
        if authenticated and error.correlation_id is not None:
            await self._sink.publish(
                error_response(self._appliance_id, error.code, error.reason, error.correlation_id),
                reply_to,
            )
        return Verdict.DEAD_LETTER


def _authentic_reply_to(error: MessageError, document: dict[str, Any]) -> str | None:
    """The reply_to of a message that failed schema validation: the decoder validates the
    schema only after the signature held, so its sender is known. None for anything
    unauthenticated. The publisher checks the destination itself."""
    reply_to = document.get("reply_to")
    if error.authenticated and isinstance(reply_to, str):
        return reply_to
    return None
