"""The SQS bus: long-polls the command queue, settles each delivery, publishes answers.

* Intake is bounded: at most ``max_in_flight`` deliveries are being handled;
  a receive asks only for as many messages as there are free slots.
* A delivery stays invisible while it is handled (its visibility is extended
  in the background), and is deleted only after the dispatcher says ACK, which
  it does only once the command is durably recorded.
* A delivery is received with a short visibility (``initial_visibility_s``)
  that its handler extends while it works: a message taken by a receive whose
  process died (a SIGKILLed appliance's long poll still in flight) is back
  within seconds, not after the full visibility timeout.
* DEAD_LETTER copies the body to the dead-letter queue before deleting it; a
  copy SQS refuses (a body at SQS's own size limit leaves no room for our
  attributes) goes as a truncated copy with the original's size and SHA-256,
  and the delivery is deleted exactly once whatever the copy met. RETRY makes
  the message visible again after a short backoff. Poison is dead-lettered by
  the dispatcher itself, so the redrive policy (``max_receive_count``, large on
  purpose) only catches messages whose handler keeps dying: receives lost to
  crashes must not dead-letter a valid command.
* Stopping stops intake, lets in-flight deliveries finish within the drain
  timeout, then cancels the rest, which SQS redelivers.

Every SQS call is retried at this edge (appliance.retrying: jittered, bounded).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from appliance.batching import Batcher
from appliance.dead_letters import SQS_MAX_BYTES, TRUNCATED_BYTES, dead_letter_copy
from appliance.dispatch.delivery import Delivery, Verdict
from appliance.errors import BusUnavailable
from appliance.health import HealthBoard
from appliance.logs import get_logger
from appliance.replies import OwnQueues, ReplyQueues
from appliance.retrying import RetryPolicy, retry
from appliance.settings import Settings
from appliance.waiting import first_of
from messages.codec import encode
from messages.events import Event
from messages.keys import ApplianceKeyPair

Outgoing = tuple[str, str, dict[str, str]]  # queue url, body, attributes
BATCH_BYTES = 240 * 1024  # SQS caps a whole batch at 256 KiB
SQS_RETRY = RetryPolicy(attempts=5, initial_s=0.1, max_s=2.0)
COMPONENT = "bus"
Handler = Callable[[Delivery], Awaitable[Verdict]]
log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class QueueUrls:
    commands: str
    responses: str
    dead_letters: str


def _transient(error: BaseException) -> bool:
    if isinstance(error, ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or code in ("Throttling", "ThrottlingException", "RequestThrottled")
    return isinstance(error, BotoCoreError | OSError | asyncio.TimeoutError)


class Slots:
    """A counting limit from which a receiver takes as many free slots as it can use."""

    def __init__(self, limit: int) -> None:
        self._free = limit
        self._changed = asyncio.Condition()

    async def take(self, most: int) -> int:
        async with self._changed:
            await self._changed.wait_for(lambda: self._free > 0)
            taken = min(most, self._free)
            self._free -= taken
            return taken

    async def give_back(self, count: int = 1) -> None:
        async with self._changed:
            self._free += count
            self._changed.notify_all()


class SqsBus:
    """The command and response queues, as one async context manager."""

    def __init__(
        self,
        settings: Settings,
        endpoint_url: str | None,
        health: HealthBoard | None = None,
        *,
        keys: ApplianceKeyPair,
    ) -> None:
        self._settings = settings
        self._endpoint_url = endpoint_url
        self._health = health
        self._stack = AsyncExitStack()
        self._client: Any = None
        self.urls = QueueUrls("", "", "")
        self.replies = ReplyQueues(OwnQueues("", frozenset()), self._queue_url)
        self.publisher = SqsPublisher(self, settings, keys)
        # Acks and answers are coalesced into batch requests under load.
        self._deletes: Batcher[str] = Batcher(self._delete_batch)
        self._responses: Batcher[Outgoing] = Batcher(
            self._send_batch,
            weight=lambda message: len(message[1].encode()) + 512,
            max_weight=BATCH_BYTES,
        )

    async def __aenter__(self) -> Self:
        settings = self._settings
        session = get_session()
        config = AioConfig(
            max_pool_connections=settings.max_in_flight + 8,
            retries={"total_max_attempts": 1},  # retries happen at our edge
            connect_timeout=5,
            read_timeout=settings.receive_wait_s + 10,
        )
        self._client = await self._stack.enter_async_context(
            session.create_client(
                "sqs",
                endpoint_url=self._endpoint_url,
                region_name=settings.region,
                aws_access_key_id=settings.aws_access_key_id.get_secret_value(),
                aws_secret_access_key=settings.aws_secret_access_key.get_secret_value(),
                config=config,
            )
        )
        self.urls = await self.call("resolve queues", self._resolve_queues)
        forbidden = frozenset({self.urls.commands, self.urls.dead_letters})
        self.replies = ReplyQueues(OwnQueues(self.urls.responses, forbidden), self._queue_url)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()

    async def call(self, operation: str, action: Callable[[], Awaitable[Any]]) -> Any:
        """Run one SQS call with bounded, jittered retries; report the bus's health."""

        def give_up(cause: BaseException, attempts: int) -> BusUnavailable:
            if self._health is not None:
                self._health.failed(COMPONENT, f"{operation}: {type(cause).__name__}")
            return BusUnavailable(operation, cause)

        result = await retry(SQS_RETRY, action, transient=_transient, give_up=give_up)
        if self._health is not None and not self._health.is_ok(COMPONENT):
            self._health.ok(COMPONENT)
        return result

    async def _resolve_queues(self) -> QueueUrls:
        settings = self._settings
        if not settings.create_queues:
            urls = [
                (await self._client.get_queue_url(QueueName=name))["QueueUrl"]
                for name in (
                    settings.command_queue,
                    settings.response_queue,
                    settings.dead_letter_queue,
                )
            ]
            return QueueUrls(*urls)
        dlq = (await self._client.create_queue(QueueName=settings.dead_letter_queue))["QueueUrl"]
        attributes = await self._client.get_queue_attributes(
            QueueUrl=dlq, AttributeNames=["QueueArn"]
        )
        redrive = {
            "deadLetterTargetArn": attributes["Attributes"]["QueueArn"],
            "maxReceiveCount": str(settings.max_receive_count),
        }
        commands = (await self._client.create_queue(QueueName=settings.command_queue))["QueueUrl"]
        # Set apart from creation: SQS refuses to "create" an existing queue with other
        # attributes, and a queue made by an older version must get today's settings.
        await self._client.set_queue_attributes(
            QueueUrl=commands,
            Attributes={
                "RedrivePolicy": json.dumps(redrive),
                "VisibilityTimeout": str(settings.visibility_timeout_s),
            },
        )
        responses = (await self._client.create_queue(QueueName=settings.response_queue))["QueueUrl"]
        # Nobody deletes an answer that is not addressed to them: unclaimed ones expire.
        await self._client.set_queue_attributes(
            QueueUrl=responses,
            Attributes={"MessageRetentionPeriod": str(settings.response_retention_s)},
        )
        return QueueUrls(commands, responses, dlq)

    async def _queue_url(self, name: str) -> str | None:
        """A queue of our own account by name, or None when there is none."""

        async def lookup() -> str | None:
            try:
                url: str = (await self._client.get_queue_url(QueueName=name))["QueueUrl"]
            except ClientError as error:
                if _transient(error):
                    raise
                return None
            return url

        result: str | None = await self.call("look up reply queue", lookup)
        return result

    async def consume(
        self, handler: Handler, stop: asyncio.Event, gate: Callable[[], Awaitable[None]]
    ) -> None:
        """Receive and handle commands until ``stop`` is set, then drain."""
        slots = Slots(self._settings.max_in_flight)
        in_flight: set[asyncio.Task[None]] = set()
        while not stop.is_set():
            await first_of(gate(), stop=stop)
            wanted = await first_of(slots.take(self._settings.receive_batch), stop=stop)
            if wanted is None:
                break
            deliveries = await first_of(self._receive(wanted), stop=stop)
            if deliveries is None:
                await slots.give_back(wanted)
                break
            await slots.give_back(wanted - len(deliveries))
            for delivery in deliveries:
                task = asyncio.create_task(self._process(delivery, handler, slots))
                in_flight.add(task)
                task.add_done_callback(_retrieved)
                task.add_done_callback(in_flight.discard)
        await self._drain(in_flight)

    async def _drain(self, in_flight: set[asyncio.Task[None]]) -> None:
        if not in_flight:
            return
        log.info("draining", in_flight=len(in_flight), within_s=self._settings.drain_timeout_s)
        _, pending = await asyncio.wait(set(in_flight), timeout=self._settings.drain_timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("drain timed out; left for redelivery", cancelled=len(pending))
            await asyncio.gather(*pending, return_exceptions=True)

    async def _receive(self, count: int) -> list[Delivery]:
        try:
            response = await self.call(
                "receive",
                lambda: self._client.receive_message(
                    QueueUrl=self.urls.commands,
                    MaxNumberOfMessages=count,
                    WaitTimeSeconds=self._settings.receive_wait_s,
                    VisibilityTimeout=self._settings.receive_visibility_s,
                    MessageSystemAttributeNames=["ApproximateReceiveCount"],
                ),
            )
        except BusUnavailable as error:
            log.warning("receive failed; backing off", error=str(error))
            await asyncio.sleep(1.0)
            return []
        return [
            Delivery(
                queue_message_id=raw["MessageId"],
                receipt_handle=raw["ReceiptHandle"],
                body=raw.get("Body", ""),
                receive_count=int(raw.get("Attributes", {}).get("ApproximateReceiveCount", 1)),
            )
            for raw in response.get("Messages", [])
        ]

    async def _process(self, delivery: Delivery, handler: Handler, slots: Slots) -> None:
        keeper = asyncio.create_task(self._keep_invisible(delivery))
        keeper.add_done_callback(_retrieved)
        try:
            try:
                verdict = await handler(delivery)
            except Exception:
                log.exception("delivery handler failed", queue_message_id=delivery.queue_message_id)
                verdict = Verdict.RETRY
            finally:
                keeper.cancel()
            await self._settle(delivery, verdict)
        except asyncio.CancelledError:
            # Cancelled by the drain: make it visible again now rather than at timeout.
            with contextlib.suppress(Exception):
                await asyncio.shield(self._set_visibility(delivery, 0))
            raise
        except BusUnavailable as error:
            log.warning("could not settle delivery; SQS will redeliver", error=str(error))
        except Exception:
            log.exception("could not settle delivery", queue_message_id=delivery.queue_message_id)
        finally:
            await slots.give_back()

    async def _keep_invisible(self, delivery: Delivery) -> None:
        """Extend the short visibility of a receive while the delivery is being handled."""
        settings = self._settings
        period = settings.receive_visibility_s / 2
        while True:
            await asyncio.sleep(period)
            try:
                await self._set_visibility(delivery, settings.visibility_timeout_s)
            except BusUnavailable as error:
                log.warning("could not extend visibility", error=str(error))
            except ClientError as error:  # e.g. the receipt is no longer valid: nothing to keep
                log.warning("could not extend visibility", error=str(error))
                return
            period = max(1.0, settings.visibility_timeout_s / 3)

    async def _set_visibility(self, delivery: Delivery, seconds: int) -> None:
        await self.call(
            "change visibility",
            lambda: self._client.change_message_visibility(
                QueueUrl=self.urls.commands,
                ReceiptHandle=delivery.receipt_handle,
                VisibilityTimeout=seconds,
            ),
        )

    async def _settle(self, delivery: Delivery, verdict: Verdict) -> None:
        if verdict is Verdict.RETRY:
            backoff = min(2 ** min(delivery.receive_count, 10), self._settings.visibility_timeout_s)
            await self._set_visibility(delivery, backoff)
            return
        if verdict is Verdict.BUSY:  # back when the other handler's lease may have lapsed
            await self._set_visibility(delivery, self._settings.receive_visibility_s)
            return
        if verdict is Verdict.DEAD_LETTER:
            await self._dead_letter(delivery)
        await self._deletes.submit(delivery.receipt_handle)

    async def _dead_letter(self, delivery: Delivery) -> None:
        """Copy ``delivery`` to the dead-letter queue; whole if SQS takes it, else truncated.

        Raises only BusUnavailable (SQS unreachable: the delivery is left for redelivery);
        a copy refused for good is logged, and the delivery is then deleted all the same.
        """
        body, attributes = dead_letter_copy(delivery, SQS_MAX_BYTES)
        for attempt in range(2):
            try:
                await self._send_one(self.urls.dead_letters, body, attributes)
                return
            except ClientError as error:
                log.warning(
                    "dead-letter queue refused the copy",
                    queue_message_id=delivery.queue_message_id,
                    error=str(error),
                    truncated="ferry_truncated" in attributes,
                )
                if attempt == 0:
                    body, attributes = dead_letter_copy(delivery, TRUNCATED_BYTES)
        log.error(
            "message could not be dead-lettered; deleted all the same",
            queue_message_id=delivery.queue_message_id,
            **{name.removeprefix("ferry_"): value for name, value in attributes.items()},
        )

    async def _send_one(self, queue_url: str, body: str, attributes: dict[str, str]) -> None:
        """One SendMessage; a refusal for good raises ClientError, an outage BusUnavailable."""
        await self.call(
            "send",
            lambda: self._client.send_message(
                QueueUrl=queue_url, MessageBody=body, MessageAttributes=_attributes(attributes)
            ),
        )

    async def _delete_batch(self, receipts: Sequence[str]) -> list[BaseException | None]:
        entries = [{"Id": str(i), "ReceiptHandle": r} for i, r in enumerate(receipts)]
        response = await self.call(
            "delete",
            lambda: self._client.delete_message_batch(QueueUrl=self.urls.commands, Entries=entries),
        )
        return _outcomes(response, len(receipts), "delete")

    async def send(self, queue_url: str, body: str, attributes: dict[str, str]) -> None:
        if queue_url != self.urls.responses:
            await self._send_one(queue_url, body, attributes)
            return
        await self._responses.submit((queue_url, body, attributes))

    async def answer(self, body: str, attributes: dict[str, str], reply_to: str | None) -> None:
        """Send an answer to ``reply_to``'s queue when it is usable, else the shared one."""
        destination = await self.replies.destination(reply_to)
        if destination != self.urls.responses:
            try:
                await self._send_one(destination, body, attributes)
                return
            except ClientError as error:  # the queue is gone, or refuses us
                assert reply_to is not None
                self.replies.unusable(reply_to, str(error))
        await self._responses.submit((self.urls.responses, body, attributes))

    async def _send_batch(self, messages: Sequence[Outgoing]) -> list[BaseException | None]:
        entries = [
            {
                "Id": str(i),
                "MessageBody": body,
                "MessageAttributes": _attributes(attributes),
            }
            for i, (_, body, attributes) in enumerate(messages)
        ]
        queue_url = messages[0][0]
        response = await self.call(
            "send",
            lambda: self._client.send_message_batch(QueueUrl=queue_url, Entries=entries),
        )
        return _outcomes(response, len(messages), "send")


def _attributes(attributes: dict[str, str]) -> dict[str, Any]:
    return {
        name: {"DataType": "String", "StringValue": value}
        for name, value in attributes.items()
        if value
    }


def _retrieved(task: asyncio.Task[Any]) -> None:
    """Done callback: log what a background task raised, so no exception goes unretrieved."""
    if not task.cancelled() and (error := task.exception()) is not None:
        log.error("background task failed", task=task.get_name(), error=repr(error))


def _outcomes(response: Any, count: int, operation: str) -> list[BaseException | None]:
    """Per-entry outcomes of a batch call: None, or the error SQS gave for that entry."""
    outcomes: list[BaseException | None] = [None] * count
    for failure in response.get("Failed", []):
        reason = f"{failure.get('Code', '?')}: {failure.get('Message', '')}"
        outcomes[int(failure["Id"])] = BusUnavailable(operation, RuntimeError(reason))
    return outcomes


class SqsPublisher:
    """The EventSink the rest of the appliance is handed: signs every event with the
    appliance's Ed25519 key and sends it on the response queue."""

    def __init__(self, bus: SqsBus, settings: Settings, keys: ApplianceKeyPair) -> None:
        self._bus = bus
        self._settings = settings
        self._keys = keys

    async def publish(self, event: Event, reply_to: str | None = None) -> None:
        settings = self._settings
        if event.appliance_id is None:
            event = event.model_copy(update={"appliance_id": settings.appliance_id})
        body = encode(event, self._keys)
        attributes = {"message_type": event.message_type, "correlation_id": event.correlation_id}
        await self._bus.answer(body, attributes, reply_to)
