"""Commands about existing migrations: cancel, status."""

from __future__ import annotations

import base64
import binascii

from appliance.errors import CommandRejected, Conflict, UnknownMigration, UnknownVm
from appliance.orchestrator.context import Deps
from appliance.orchestrator.record import load
from appliance.orchestrator.requests import find_vm
from appliance.orchestrator.resume import Resumes, resumable
from appliance.orchestrator.scheduler import Scheduler, group_lease
from appliance.orchestrator.states import MIGRATING_BACK, RESTING, TERMINAL, Step
from appliance.state.migrations import StoredMigration
from messages.commands import CancelRequest, MigrationSelector, StatusRequest
from messages.events import MigrationStatus, SourceCloneResponse

NOT_CANCELLABLE = frozenset({Step.FINALIZING, *TERMINAL, *RESTING, *MIGRATING_BACK})
"""A VM running in the cloud (tbc) ends by a migrate back or a commit, not a cancel."""


class MigrationControl:
    def __init__(self, deps: Deps, scheduler: Scheduler, onprem: str = "onprem") -> None:
        self._deps = deps
        self._scheduler = scheduler
        self._onprem = onprem
        self._resumes = Resumes(deps, group_lease)

    async def select(self, selector: MigrationSelector) -> list[str]:
        """Migration ids a selector names; unknown references are an error, not ignored."""
        migrations = self._deps.migrations
        ids = list(selector.migration_ids)
        if selector.request_id is not None:
            found = await migrations.request(selector.request_id)
            if found is None:
                raise UnknownMigration(f"request {selector.request_id}")
            ids.extend(found)
        for ref in selector.vms:
            try:
                vm = await find_vm(self._deps.site(self._onprem), ref)
            except UnknownVm:
                raise UnknownMigration(f"VM {ref}") from None
            holder = await migrations.lock_holder(self._onprem, vm.vm_id)
            if holder is None:
                raise UnknownMigration(f"VM {ref}")
            ids.append(holder)
        unique = list(dict.fromkeys(ids))
        stored = {s.migration_id for s in await migrations.get_many(unique)}
        missing = [i for i in unique if i not in stored]
        if missing:
            raise UnknownMigration(", ".join(missing))
        return unique

    async def cancel(self, command: CancelRequest) -> list[SourceCloneResponse]:
        migrations = self._deps.migrations
        chosen = await migrations.get_many(await self.select(command.body.select))
        if chosen and all(resumable(load(s.record)) for s in chosen):
            # Failed, data kept for a resume: cancelling drops what was kept.
            dropped = await self._resumes.discard([s.migration_id for s in chosen])
            return [
                self._deps.reporter.response(r, False, correlation_id=command.correlation_id)
                for r in dropped
            ]
        steps = {s.migration_id: Step(s.step) for s in chosen}
        refused = [i for i, step in steps.items() if step in NOT_CANCELLABLE]
        if refused:
            described = ", ".join(f"{i} is {steps[i].value}" for i in refused)
            raise Conflict(f"cannot cancel: {described}")
        affected: list[StoredMigration] = []
        for group_id in dict.fromkeys(load(s.record).group_id for s in chosen):
            info = await migrations.group(group_id)
            members = await migrations.get_many(list(info.members)) if info else []
            for member in members:
                if Step(member.step) not in NOT_CANCELLABLE:
                    await migrations.request_cancel(member.migration_id)
                    affected.append(member)
            self._scheduler.cancel_here(group_id)
        self._scheduler.wake()
        return [
            self._deps.reporter.response(
                load(s.record), True, correlation_id=command.correlation_id
            )
            for s in affected
        ]

    async def status_page(
        self, command: StatusRequest
    ) -> tuple[tuple[MigrationStatus, ...], str | None]:
        body = command.body
        if body.migration_ids or body.request_id:
            selector = MigrationSelector(
                migration_ids=body.migration_ids, request_id=body.request_id
            )
            ids = await self.select(selector)
            offset, more = 0, False
        else:
            offset = _offset(body.page_token)
            ids = await self._deps.migrations.page(offset, body.page_size + 1)
            more = len(ids) > body.page_size
            ids = ids[: body.page_size]
        stored = await self._deps.migrations.get_many(ids)
        statuses = tuple(
            [
                await self._deps.reporter.status(load(s.record), s.cancel_requested)
                for s in stored
                if body.include_finished or Step(s.step) not in TERMINAL
            ]
        )
        token = _token(offset + body.page_size) if more else None
        return statuses, token

    async def counts(self) -> dict[str, int]:
        return await self._deps.migrations.counts()


def _token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"offset:{offset}".encode()).decode()


def _offset(token: str | None) -> int:
    if token is None:
        return 0
    try:
        kind, _, value = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        if kind == "offset" and value.isdigit():
            return int(value)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        pass
    raise CommandRejected("page_token is not one this appliance issued")
