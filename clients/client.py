"""FerryClient: send signed commands, await answers by correlation id, follow heartbeats.

Several clients (CLIs, scripts, monitors) share one appliance, so a client
never takes what is not addressed to it:

* Where it may create queues, a client makes a private reply queue, names it
  in every command's ``reply_to``, and deletes it on exit. Everything on it
  is this client's: delivered to a waiter, or dropped.
* It reads the shared response queue too (always without a private queue;
  with one, for heartbeats and for answers the appliance could not send to
  the reply queue, e.g. a rejection of a message it could not authenticate),
  but only while someone here waits for an answer or a heartbeat. There it
  deletes only what it delivered: an answer to one of its own correlation
  ids, or a verified heartbeat that tells nobody anything any more (too old,
  or seconds older than a later one from the same appliance). A heartbeat is
  everyone's: each follower here gets it once, and it is left for the
  followers elsewhere (several ``ferry watch`` each see every heartbeat). Anything else,
  including whatever it cannot verify (another appliance's, or a stale
  token here), is made visible to the others again at once, and this client
  stands back from the queue for a moment so that their owner's read gets
  them; answers nobody collects expire by the queue's retention period.

Every event is verified against the pinned appliance key (Ed25519); one that
does not verify is dropped with a logged warning, so a client holding the bus
token cannot forge an appliance's answer. Answers are de-duplicated by message
id, since SQS delivers at least once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import ClientError

from clients.config import ClientSettings
from messages.codec import Decoder, Trust, encode
from messages.commands import (
    BulkMigrationDoneRequest,
    BulkMigrationDoneRequestBody,
    Command,
    CommitRequest,
    CommitRequestBody,
    EventsRequest,
    EventsRequestBody,
    GuestCredentials,
    InventoryFilter,
    MigrateBackRequest,
    MigrateBackRequestBody,
    MigrationSelector,
    SetPolicyRequest,
    SetPolicyRequestBody,
    SourceInventoryRequest,
    SourceInventoryRequestBody,
    StatusRequest,
    StatusRequestBody,
    SyncRequest,
    SyncRequestBody,
)
from messages.common import VmSummary
from messages.errors import MessageError
from messages.events import (
    CommandResponse,
    ErrorResponse,
    Event,
    EventsResponse,
    Heartbeat,
    SourceInventoryResponse,
    StatusResponse,
)

log = logging.getLogger(__name__)
RELEASE_S = 1  # others' messages from a full batch: hidden this long while we look past them
STAND_BACK_S = 2.0  # after letting others' messages go: their owners read next, not us
SUPERSEDED_S = 3.0  # a heartbeat this much older than one seen since tells nobody anything
LINGER_S = 1.0  # after the answers expected: how long more (a dependency group's) may take
REPLY_QUEUE_RETENTION_S = 3600


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
        private_queue: bool = True,
        stale_heartbeat_s: float = 300.0,
    ) -> None:
        self.settings = settings
        self.appliance_key = settings.public_key  # no pinned key: ValueError, no client
        self._decoder = Decoder(
            Trust(appliance_key=self.appliance_key), accept=(Event,), max_bytes=1024 * 1024
        )
        self._want_private = private_queue
        self._stale_heartbeat_s = stale_heartbeat_s
        self._stack = AsyncExitStack()
        self._sqs: Any = None
        self._command_url = ""
        self._response_url = ""
        self.reply_queue: str | None = None  # the private reply queue's name, when there is one
        self._reply_url: str | None = None
        self._waiters: dict[str, asyncio.Queue[Event]] = {}
        self._heartbeat_queues: list[asyncio.Queue[Heartbeat]] = []
        self._interest = asyncio.Event()  # someone here waits for something: read the shared queue
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._newest_beat: dict[str, datetime] = {}  # per appliance: latest heartbeat sent_at
        self._receivers: list[asyncio.Task[None]] = []

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
        if self._want_private:
            await self._make_reply_queue()
        if self._reply_url is not None:
            self._receivers.append(asyncio.create_task(self._receive_forever(self._reply_url)))
        self._receivers.append(asyncio.create_task(self._receive_forever(self._response_url)))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for receiver in self._receivers:
            receiver.cancel()
        for receiver in self._receivers:
            with contextlib.suppress(asyncio.CancelledError):
                await receiver
        if self._reply_url is not None:
            with contextlib.suppress(Exception):
                await self._sqs.delete_queue(QueueUrl=self._reply_url)
        await self._stack.aclose()

    async def _make_reply_queue(self) -> None:
        """A private reply queue, if this client may create queues; else the shared one only."""
        shared = self._response_url.rsplit("/", 1)[-1]
        name = f"{shared[:60]}-reply-{uuid.uuid4().hex[:12]}"
        try:
            response = await self._sqs.create_queue(
                QueueName=name,
                Attributes={"MessageRetentionPeriod": str(REPLY_QUEUE_RETENTION_S)},
            )
        except ClientError as error:
            log.info("no private reply queue (%s); reading the shared response queue", error)
            return
        self.reply_queue, self._reply_url = name, response["QueueUrl"]

    async def _queue_url(self, name_or_url: str) -> str:
        if name_or_url.startswith(("http://", "https://")):
            return name_or_url
        response = await self._sqs.get_queue_url(QueueName=name_or_url)
        url: str = response["QueueUrl"]
        return url

    # --- sending ---------------------------------------------------------------

    async def send(self, command: Command) -> Command:
        """Sign and send ``command`` (its answers to our reply queue, unless it names one);
        register for its answers first so none is missed. Returns what was sent."""
        if command.reply_to is None and self.reply_queue is not None:
            command = command.model_copy(update={"reply_to": self.reply_queue})
        self._waiter(command.correlation_id)
        await self._sqs.send_message(
            QueueUrl=self._command_url, MessageBody=encode(command, self.settings.token)
        )
        return command

    async def send_raw(self, body: str) -> None:
        """Send a body as is (for tests and tools that probe the appliance's input checks)."""
        await self._sqs.send_message(QueueUrl=self._command_url, MessageBody=body)

    def expect(self, correlation_id: str) -> None:
        """Register interest in answers for a correlation id sent some other way."""
        self._waiter(correlation_id)

    def _waiter(self, correlation_id: str) -> asyncio.Queue[Event]:
        queue = self._waiters.setdefault(correlation_id, asyncio.Queue())
        self._interest.set()
        return queue

    def _update_interest(self) -> None:
        if self._waiters or self._heartbeat_queues:
            self._interest.set()
        else:
            self._interest.clear()

    async def request(self, command: Command, timeout_s: float = 30.0) -> Event:
        """Send ``command`` and return its first answer; ErrorResponse raises FerryError."""
        await self.send(command)
        try:
            return await self.next_answer(command.correlation_id, timeout_s)
        except TimeoutError:
            raise NoAnswer(command, timeout_s) from None

    async def next_answer(self, correlation_id: str, timeout_s: float = 30.0) -> Event:
        queue = self._waiter(correlation_id)
        event = await asyncio.wait_for(queue.get(), timeout=timeout_s)
        if isinstance(event, ErrorResponse):
            raise FerryError(event)
        return event

    async def answers(self, correlation_id: str) -> AsyncIterator[Event]:
        """Every answer for ``correlation_id`` as it arrives (progress responses, ...)."""
        queue = self._waiter(correlation_id)
        while True:
            yield await queue.get()

    def forget(self, correlation_id: str) -> None:
        self._waiters.pop(correlation_id, None)
        self._update_interest()

    async def heartbeats(self) -> AsyncIterator[Heartbeat]:
        queue: asyncio.Queue[Heartbeat] = asyncio.Queue()
        self._heartbeat_queues.append(queue)
        self._interest.set()
        try:
            while True:
                yield await queue.get()
        finally:
            self._heartbeat_queues.remove(queue)
            self._update_interest()

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

    async def events(self, body: EventsRequestBody | None = None) -> EventsResponse:
        """The appliance's event log, newest last."""
        answer = await self.request(EventsRequest(body=body or EventsRequestBody()))
        assert isinstance(answer, EventsResponse)
        self.forget(answer.correlation_id)
        return answer

    async def command(
        self,
        command: Command,
        *,
        expect: int = 1,
        timeout_s: float = 30.0,
        linger_s: float = LINGER_S,
    ) -> list[Event]:
        """Send ``command`` and return its answers: ``expect`` of them (each within
        ``timeout_s``), then any more that follow within ``linger_s`` (a command about one
        VM may answer for its whole dependency group). ErrorResponse raises FerryError."""
        await self.send(command)
        answers: list[Event] = []
        try:
            while True:
                wait = timeout_s if len(answers) < expect else linger_s
                try:
                    answers.append(await self.next_answer(command.correlation_id, wait))
                except TimeoutError:
                    if len(answers) < expect:
                        raise NoAnswer(command, timeout_s) from None
                    return answers
        finally:
            self.forget(command.correlation_id)

    async def migrate_back(
        self, select: MigrationSelector, *, power_on: bool = False, keep_snapshot: bool = False
    ) -> list[Event]:
        """Bring VMs resting in the cloud back on-prem (their dependency groups with them)."""
        body = MigrateBackRequestBody(select=select, power_on=power_on, keep_snapshot=keep_snapshot)
        return await self.command(MigrateBackRequest(body=body), expect=_selected(select))

    async def commit(self, select: MigrationSelector) -> list[Event]:
        body = CommitRequestBody(select=select)
        return await self.command(CommitRequest(body=body), expect=_selected(select))

    async def sync(self, select: MigrationSelector, timeout_s: float = 30.0) -> list[Event]:
        """A flush epoch now (a VM resting in the cloud), or a resume (a failed migration)."""
        body = SyncRequestBody(select=select)
        return await self.command(
            SyncRequest(body=body), expect=_selected(select), timeout_s=timeout_s
        )

    async def bulk_done(self, select: MigrationSelector, package_location: str) -> list[Event]:
        """Offline bulk data has been imported at the cloud from ``package_location``."""
        body = BulkMigrationDoneRequestBody(select=select, package_location=package_location)
        return await self.command(BulkMigrationDoneRequest(body=body), expect=_selected(select))

    async def set_policy(self, body: SetPolicyRequestBody) -> CommandResponse:
        (answer,) = await self.command(SetPolicyRequest(body=body), linger_s=0)
        assert isinstance(answer, CommandResponse)
        return answer

    def seal_credentials(self, username: str, password: str) -> GuestCredentials:
        """Guest credentials sealed to the pinned appliance key, for a SourceCloneRequest."""
        return GuestCredentials(sealed=self.appliance_key.seal_login(username, password))

    # --- receiving ---------------------------------------------------------------

    async def _receive_forever(self, queue_url: str) -> None:
        private = queue_url == self._reply_url
        while True:
            if not private:
                await self._interest.wait()
            try:
                response = await self._sqs.receive_message(
                    QueueUrl=queue_url,
                    MaxNumberOfMessages=10,
                    WaitTimeSeconds=self.settings.receive_wait_s,
                )
            except asyncio.CancelledError:
                raise
            except Exception:  # the queue service hiccupped; try again shortly
                await asyncio.sleep(1.0)
                continue
            decoded = [(self._decode(raw), raw) for raw in response.get("Messages", [])]
            others = []
            for event, raw in sorted(decoded, key=lambda pair: _sent_at(pair[0])):
                if not await self._route(event, raw, queue_url, private=private):
                    others.append(raw)
            await self._let_go(queue_url, others, full=len(decoded) == 10)

    async def _let_go(self, queue_url: str, others: list[dict[str, Any]], *, full: bool) -> None:
        """Make others' messages visible again. After a full batch there may be more behind
        them: hide these a moment and look again at once. Otherwise show them at once and
        stand back, so that their owners' reads get them rather than ours."""
        if not others:
            return
        entries = [
            {"Id": str(i), "ReceiptHandle": raw["ReceiptHandle"], "VisibilityTimeout": 0}
            for i, raw in enumerate(others)
        ]
        if full:
            for entry in entries:
                entry["VisibilityTimeout"] = RELEASE_S
        with contextlib.suppress(Exception):
            await self._sqs.change_message_visibility_batch(QueueUrl=queue_url, Entries=entries)
        if not full:
            await asyncio.sleep(STAND_BACK_S)

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

    async def _route(
        self, event: Event | None, raw: dict[str, Any], queue_url: str, *, private: bool
    ) -> bool:
        """Deliver what is ours and delete it (True); anything else is let go (False).

        A heartbeat is everyone's: delivered here once, and left for the other followers
        until it is outdated (then whoever sees it drops it)."""
        if isinstance(event, Heartbeat):
            if event.message_id not in self._seen and self._deliver(event):
                self._remember(event.message_id)
            mine = private or self._outdated_heartbeat(event)
        elif event is not None and (event.message_id in self._seen or self._deliver(event)):
            self._remember(event.message_id)  # delivered here now, or a duplicate of that
            mine = True
        else:
            mine = private
        if mine:
            await self._delete(raw, queue_url)
        return mine

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

    def _outdated_heartbeat(self, event: Event) -> bool:
        """A verified heartbeat that tells nobody anything any more: too old, or superseded
        by a later one from the same appliance. Nobody's answer, so any client may drop it
        (else heartbeats nobody follows would pile up in front of the answers)."""
        if not isinstance(event, Heartbeat):
            return False
        appliance = event.body.appliance_id
        newest = max(self._newest_beat.get(appliance, event.sent_at), event.sent_at)
        self._newest_beat[appliance] = newest
        age_s = (datetime.now(UTC) - event.sent_at).total_seconds()
        superseded_s = (newest - event.sent_at).total_seconds()
        return age_s > self._stale_heartbeat_s or superseded_s >= SUPERSEDED_S

    def _remember(self, message_id: str) -> None:
        self._seen[message_id] = None
        while len(self._seen) > 10_000:
            self._seen.popitem(last=False)

    async def _delete(self, raw: dict[str, Any], queue_url: str) -> None:
        with contextlib.suppress(Exception):
            await self._sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=raw["ReceiptHandle"])


def _selected(select: MigrationSelector) -> int:
    """How many answers a selector is sure to get: one per migration or VM it names."""
    return max(1, len(select.migration_ids) + len(select.vms))


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

    def set_policy(self, body: SetPolicyRequestBody) -> CommandResponse:
        return self._runner.run(self._client.set_policy(body))

    def migrate_back(
        self, select: MigrationSelector, *, power_on: bool = False, keep_snapshot: bool = False
    ) -> list[Event]:
        return self._runner.run(
            self._client.migrate_back(select, power_on=power_on, keep_snapshot=keep_snapshot)
        )

    def commit(self, select: MigrationSelector) -> list[Event]:
        return self._runner.run(self._client.commit(select))

    def sync(self, select: MigrationSelector) -> list[Event]:
        return self._runner.run(self._client.sync(select))

    def bulk_done(self, select: MigrationSelector, package_location: str) -> list[Event]:
        return self._runner.run(self._client.bulk_done(select, package_location))

    def close(self) -> None:
        self._runner.run(self._client.__aexit__(None, None, None))
        self._runner.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
