"""FerryClient: send signed commands, await answers by correlation id, follow heartbeats.

One background receiver reads the response queue and routes each message:

* an answer whose correlation id someone here awaits goes to that waiter and
  is deleted;
* a heartbeat goes to heartbeat subscribers and is deleted; with no
  subscriber it is left for others, unless stale;
* anything else is left for other clients (visible again after a few
  seconds), and deleted once it is older than ``orphan_after_s``.

Every event is verified against the pinned appliance key (Ed25519); one that
does not verify is dropped with a logged warning, so a client holding the bus
token cannot forge an appliance's answer. Answers are de-duplicated by message
id, since SQS delivers at least once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from clients.config import ClientSettings
from messages.codec import Decoder, Trust, encode
from messages.commands import (
    Command,
    GuestCredentials,
    InventoryFilter,
    SourceInventoryRequest,
    SourceInventoryRequestBody,
    StatusRequest,
    StatusRequestBody,
)
from messages.common import VmSummary
from messages.errors import MessageError
from messages.events import (
    ErrorResponse,
    Event,
    Heartbeat,
    SourceInventoryResponse,
    StatusResponse,
)

log = logging.getLogger(__name__)


class FerryError(Exception):
    """The appliance answered with an ErrorResponse."""

    def __init__(self, response: ErrorResponse) -> None:
        self.response = response
        self.code = response.body.code
        super().__init__(f"{response.body.code.value}: {response.body.message}")


class NoAnswer(TimeoutError):
    def __init__(self, command: Command, timeout_s: float) -> None:
        self.command = command
        super().__init__(f"no answer to {command.message_type} within {timeout_s:.0f}s")


class FerryClient:
    def __init__(
        self,
        settings: ClientSettings,
        *,
        orphan_after_s: float = 900.0,
        stale_heartbeat_s: float = 300.0,
    ) -> None:
        self.settings = settings
        self.appliance_key = settings.public_key  # no pinned key: ValueError, no client
        self._decoder = Decoder(
            Trust(appliance_key=self.appliance_key), accept=(Event,), max_bytes=1024 * 1024
        )
        self._orphan_after_s = orphan_after_s
        self._stale_heartbeat_s = stale_heartbeat_s
        self._stack = AsyncExitStack()
        self._sqs: Any = None
        self._command_url = ""
        self._response_url = ""
        self._waiters: dict[str, asyncio.Queue[Event]] = {}
        self._heartbeat_queues: list[asyncio.Queue[Heartbeat]] = []
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._receiver: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        s = self.settings
        self._sqs = await self._stack.enter_async_context(
            get_session().create_client(
                "sqs",
                endpoint_url=s.sqs_endpoint,
                region_name=s.region,
                aws_access_key_id=s.aws_access_key_id.get_secret_value(),
                aws_secret_access_key=s.aws_secret_access_key.get_secret_value(),
                config=AioConfig(read_timeout=s.receive_wait_s + 10, max_pool_connections=20),
            )
        )
        self._command_url = await self._queue_url(s.command_queue)
        self._response_url = await self._queue_url(s.response_queue)
        self._receiver = asyncio.create_task(self._receive_forever())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._receiver is not None:
            self._receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._receiver
        await self._stack.aclose()

    async def _queue_url(self, name_or_url: str) -> str:
        if name_or_url.startswith(("http://", "https://")):
            return name_or_url
        response = await self._sqs.get_queue_url(QueueName=name_or_url)
        url: str = response["QueueUrl"]
        return url

    # --- sending ---------------------------------------------------------------

    async def send(self, command: Command) -> Command:
        """Sign and send ``command``; register for its answers first so none is missed."""
        self._waiters.setdefault(command.correlation_id, asyncio.Queue())
        await self._sqs.send_message(
            QueueUrl=self._command_url, MessageBody=encode(command, self.settings.token)
        )
        return command

    async def send_raw(self, body: str) -> None:
        """Send a body as is (for tests and tools that probe the appliance's input checks)."""
        await self._sqs.send_message(QueueUrl=self._command_url, MessageBody=body)

    def expect(self, correlation_id: str) -> None:
        """Register interest in answers for a correlation id sent some other way."""
        self._waiters.setdefault(correlation_id, asyncio.Queue())

    async def request(self, command: Command, timeout_s: float = 30.0) -> Event:
        """Send ``command`` and return its first answer; ErrorResponse raises FerryError."""
        await self.send(command)
        try:
            return await self.next_answer(command.correlation_id, timeout_s)
        except TimeoutError:
            raise NoAnswer(command, timeout_s) from None

    async def next_answer(self, correlation_id: str, timeout_s: float = 30.0) -> Event:
        queue = self._waiters.setdefault(correlation_id, asyncio.Queue())
        event = await asyncio.wait_for(queue.get(), timeout=timeout_s)
        if isinstance(event, ErrorResponse):
            raise FerryError(event)
        return event

    async def answers(self, correlation_id: str) -> AsyncIterator[Event]:
        """Every answer for ``correlation_id`` as it arrives (progress responses, ...)."""
        queue = self._waiters.setdefault(correlation_id, asyncio.Queue())
        while True:
            yield await queue.get()

    def forget(self, correlation_id: str) -> None:
        self._waiters.pop(correlation_id, None)

    async def heartbeats(self) -> AsyncIterator[Heartbeat]:
        queue: asyncio.Queue[Heartbeat] = asyncio.Queue()
        self._heartbeat_queues.append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._heartbeat_queues.remove(queue)

    # --- conveniences ------------------------------------------------------------

    async def inventory(
        self, filters: InventoryFilter | None = None, page_size: int = 100, timeout_s: float = 30.0
    ) -> list[VmSummary]:
        """Every matching VM, following next_page_token to the end."""
        vms: list[VmSummary] = []
        token: str | None = None
        while True:
            body = SourceInventoryRequestBody(
                filters=filters or InventoryFilter(), page_size=page_size, page_token=token
            )
            answer = await self.request(SourceInventoryRequest(body=body), timeout_s)
            assert isinstance(answer, SourceInventoryResponse)
            self.forget(answer.correlation_id)
            vms.extend(answer.body.vms)
            token = answer.body.next_page_token
            if token is None:
                return vms

    async def status(self, body: StatusRequestBody | None = None) -> StatusResponse:
        answer = await self.request(StatusRequest(body=body or StatusRequestBody()))
        assert isinstance(answer, StatusResponse)
        self.forget(answer.correlation_id)
        return answer

    def seal_credentials(self, username: str, password: str) -> GuestCredentials:
        """Guest credentials sealed to the pinned appliance key, for a SourceCloneRequest."""
        return GuestCredentials(sealed=self.appliance_key.seal_login(username, password))

    # --- receiving ---------------------------------------------------------------

    async def _receive_forever(self) -> None:
        while True:
            try:
                response = await self._sqs.receive_message(
                    QueueUrl=self._response_url,
                    MaxNumberOfMessages=10,
                    WaitTimeSeconds=self.settings.receive_wait_s,
                )
            except asyncio.CancelledError:
                raise
            except Exception:  # the queue service hiccupped; try again shortly
                await asyncio.sleep(1.0)
                continue
            decoded = [(self._decode(raw), raw) for raw in response.get("Messages", [])]
            for event, raw in sorted(decoded, key=lambda pair: _sent_at(pair[0])):
                await self._route(event, raw)

    def _decode(self, raw: dict[str, Any]) -> Event | None:
        try:
            event = self._decoder.decode(raw.get("Body", ""))
        except MessageError as error:
            log.warning(
                "dropped a response-queue message that does not verify (%s: %s), SQS id %s",
                error.code.value,
                error.reason,
                raw.get("MessageId", "?"),
            )
            return None
        assert isinstance(event, Event)
        return event

    async def _route(self, event: Event | None, raw: dict[str, Any]) -> None:
        if event is None:
            await self._delete(raw)  # unsigned or forged: nobody should act on it
            return
        if event.message_id in self._seen:
            await self._delete(raw)
            return
        if self._deliver(event):
            self._remember(event.message_id)
            await self._delete(raw)
        elif self._age_s(event) > self._limit_for(event):
            await self._delete(raw)
        else:
            with contextlib.suppress(Exception):
                await self._sqs.change_message_visibility(
                    QueueUrl=self._response_url,
                    ReceiptHandle=raw["ReceiptHandle"],
                    VisibilityTimeout=3,
                )

    def _deliver(self, event: Event) -> bool:
        if isinstance(event, Heartbeat):
            for queue in self._heartbeat_queues:
                queue.put_nowait(event)
            return bool(self._heartbeat_queues)
        waiter = self._waiters.get(event.correlation_id)
        if waiter is None:
            return False
        waiter.put_nowait(event)
        return True

    def _limit_for(self, event: Event) -> float:
        return self._stale_heartbeat_s if isinstance(event, Heartbeat) else self._orphan_after_s

    @staticmethod
    def _age_s(event: Event) -> float:
        return (datetime.now(UTC) - event.sent_at).total_seconds()

    def _remember(self, message_id: str) -> None:
        self._seen[message_id] = None
        while len(self._seen) > 10_000:
            self._seen.popitem(last=False)

    async def _delete(self, raw: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):
            await self._sqs.delete_message(
                QueueUrl=self._response_url, ReceiptHandle=raw["ReceiptHandle"]
            )


def _sent_at(event: Event | None) -> datetime:
    return event.sent_at if event is not None else datetime.min.replace(tzinfo=UTC)


class FerrySyncClient:
    """A blocking wrapper: the same client on a private event loop."""

    def __init__(self, settings: ClientSettings) -> None:
        self._runner = asyncio.Runner()
        self._client = FerryClient(settings)
        self._runner.run(self._client.__aenter__())

    def request(self, command: Command, timeout_s: float = 30.0) -> Event:
        return self._runner.run(self._client.request(command, timeout_s))

    def inventory(self, filters: InventoryFilter | None = None) -> Sequence[VmSummary]:
        return self._runner.run(self._client.inventory(filters))

    def status(self) -> StatusResponse:
        return self._runner.run(self._client.status())

    def close(self) -> None:
        self._runner.run(self._client.__aexit__(None, None, None))
        self._runner.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
