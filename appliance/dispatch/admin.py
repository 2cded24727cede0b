"""Commands about the appliance itself: status, policy, reset."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from redis.asyncio import Redis

from appliance.clock import Clock, SystemClock
from appliance.errors import CommandRejected
from appliance.health import HealthBoard
from appliance.logs import get_logger
from appliance.orchestrator.leftovers import ResetCleanup, Undone
from appliance.state.events import EventLog
from appliance.state.policy import Policies, Policy
from appliance.state.store import StateStore
from messages.commands import Command, ResetRequest, SetPolicyRequest, StatusRequest
from messages.events import (
    CommandResponse,
    CommandResponseBody,
    Event,
    MigrationStatus,
    ReadyStatus,
    ResetOutcome,
    StatusResponse,
    StatusResponseBody,
    UndoneMigration,
)

log = get_logger(__name__)
StatusPage = Callable[[StatusRequest], Awaitable[tuple[tuple[MigrationStatus, ...], str | None]]]
Counts = Callable[[], Awaitable[dict[str, int]]]


async def _no_migrations(_request: StatusRequest) -> tuple[tuple[MigrationStatus, ...], str | None]:
    return (), None


async def _no_counts() -> dict[str, int]:
    return {}


class Admin:
    def __init__(
        self,
        *,
        appliance_id: str,
        store: StateStore,
        health: HealthBoard,
        generation_file: Path,
        status_page: StatusPage = _no_migrations,
        counts: Counts = _no_counts,
        reset_cleanup: ResetCleanup | None = None,
        clock: Clock | None = None,
        policies: Policies | None = None,
        on_policy_change: Callable[[], None] | None = None,
    ) -> None:
        self._appliance_id = appliance_id
        self._store = store
        self._policies = policies or Policies(store)
        self._on_policy_change = on_policy_change  # wakes the scheduler: new limits apply now
        self._health = health
        self._generation_file = generation_file
        self._status_page = status_page
        self._counts = counts
        self._reset_cleanup = reset_cleanup
        self._clock = clock or SystemClock()
        self._events = EventLog(store)

    def handlers(self) -> dict[str, Callable[[Command], Awaitable[Sequence[Event]]]]:
        return {
            "StatusRequest": self.status,
            "SetPolicyRequest": self.set_policy,
            "ResetRequest": self.reset,
        }

    async def status(self, command: Command) -> Sequence[Event]:
        assert isinstance(command, StatusRequest)
        migrations, token = await self._status_page(command)
        ready = ReadyStatus.READY if self._health.ready else ReadyStatus.NOT_READY
        body = StatusResponseBody(
            status=ready,
            migrations=migrations,
            next_page_token=token,
            migration_counts=await self._counts(),
            policy=(await self._policies.effective()).as_dict(),
            status_details=self._health.summary(),
            components=self._health.statuses(),
        )
        return [
            StatusResponse(
                appliance_id=self._appliance_id, correlation_id=command.correlation_id, body=body
            )
        ]

    async def set_policy(self, command: Command) -> Sequence[Event]:
        assert isinstance(command, SetPolicyRequest)
        body = command.body
        wanted = Policy(
            rto_rpo_interval_s=body.rto_rpo_interval_s,
            rpo_dirty_bytes=body.rpo_dirty_bytes,
            max_concurrent_migrations=body.max_concurrent_migrations,
            max_in_progress_per_cache_node=body.max_in_progress_per_cache_node,
            max_resting_per_cache_node=body.max_resting_per_cache_node,
            bandwidth_cap_mbps=body.bandwidth_cap_mbps,
        )
        if wanted == Policy():
            raise CommandRejected("SetPolicyRequest sets nothing: give at least one value")
        policy = await self._policies.set(body.cluster, wanted)
        detail = f"policy for {body.cluster or 'default'}: {policy.as_dict()}"
        log.info("policy set", cluster=body.cluster, **policy.as_dict())
        if self._on_policy_change is not None:
            self._on_policy_change()
        return [self._ack(command, detail)]

    async def reset(self, command: Command) -> Sequence[Event]:
        """Stop local runs; bring the VMs the components serve home to their last committed
        epoch (a warm VM cut over stays on its volumes); forget every record and the
        components' orders; undo what other unfinished migrations left on the sites (found
        by their tags, not in Redis); say, per VM, what was done (see orchestrator/
        reset_return.py for what "component state removed" means)."""
        assert isinstance(command, ResetRequest)
        if not command.body.confirm:
            raise CommandRejected("ResetRequest needs confirm: true")
        cleanup = self._reset_cleanup
        # No run starts here until the reset is over (its leases are the groups' then).
        async with cleanup.runs_held() if cleanup is not None else contextlib.nullcontext():
            unfinished = await cleanup.stop() if cleanup is not None else []
            returned = await cleanup.bring_home(unfinished) if cleanup is not None else []
            deleted = await self._delete_all_but(command.message_id)
            generation = await self._store.adopt_new_generation(self._generation_file)
            self._health.ok("state_generation", generation)
            undone = await cleanup.undo(unfinished, returned) if cleanup is not None else []
        await self._record(undone)
        down = cleanup.components_down if cleanup is not None else []
        log.warning("state reset", keys_deleted=deleted, leftovers=len(undone), down=down)
        body = CommandResponseBody(
            command_type=command.message_type,
            detail=_detail(deleted, undone, down),
            migration_ids=tuple(item.migration_id for item in undone),
            undone=tuple(_wire(item) for item in undone),
        )
        return [
            CommandResponse(
                appliance_id=self._appliance_id, correlation_id=command.correlation_id, body=body
            )
        ]

    async def _record(self, undone: Sequence[Undone]) -> None:
        for item in undone:
            await self._events.append(
                "leftovers_undone",
                self._clock.now().isoformat(),
                migration_id=item.migration_id,
                vm_id=item.vm_id,
                actions=list(item.actions),
                error=item.error,
                outcome=item.outcome.value,
                epoch=item.epoch,
            )

    async def _delete_all_but(self, message_id: str) -> int:
        """Every key of our prefix, except this command's own record (it is being answered)
        and what the reset leaves of the components (their heartbeats; a down one's orders)."""
        keep = self._store.keys.command(message_id)
        pattern = self._store.keys.pattern
        cleanup = self._reset_cleanup

        def kept(key: str) -> bool:
            return key == keep or (cleanup is not None and cleanup.keeps(key))

        async def delete(r: Redis) -> int:
            count = 0
            async for key in r.scan_iter(match=pattern, count=1000):
                if not kept(key.decode() if isinstance(key, bytes) else str(key)):
                    count += await r.delete(key)
            return count

        return await self._store.run(delete)

    def _ack(self, command: Command, detail: str) -> CommandResponse:
        body = CommandResponseBody(command_type=command.message_type, accepted=True, detail=detail)
        return CommandResponse(
            appliance_id=self._appliance_id, correlation_id=command.correlation_id, body=body
        )


def _wire(item: Undone) -> UndoneMigration:
    return UndoneMigration(
        migration_id=item.migration_id[:128],
        vm_id=item.vm_id[:255],
        actions=item.actions,
        error=item.error[:1024] if item.error else None,
        outcome=item.outcome,
        epoch=item.epoch,
    )


def _detail(deleted: int, undone: Sequence[Undone], down: Sequence[str]) -> str:
    returned = sum(1 for item in undone if item.outcome is ResetOutcome.RETURNED)
    kept = sum(1 for item in undone if item.outcome is ResetOutcome.KEPT_IN_CLOUD)
    failed = sum(1 for item in undone if item.error)
    detail = (
        f"state reset: {deleted} keys removed, new generation started; "
        f"{len(undone)} unfinished migration(s): {returned} brought home to their last "
        f"committed epoch, {kept} kept in the cloud, {len(undone) - returned - kept} undone "
        "on the sites"
    )
    if failed:
        detail += f"; {failed} with an error"
    if down:
        detail += f"; down: {', '.join(down)} (its close orders wait for it)"
    return detail
