"""Migration records in Redis: created together per group, changed by compare-and-set.

The state layer does not know the orchestrator's states: a record is stored
as its ``step`` (the state-machine state, compared and set atomically), its
``public`` state (what clients see; counted in ``{p}:migration-counts``), a
JSON ``record`` the orchestrator owns, and a ``cancel`` flag any process may
raise. Every write made for a running migration (its step and record with the
step's event, a VM unlock, a secret's removal) is fenced by the writer's lease:
a stale token raises :class:`~appliance.errors.FencedOut` and nothing is written.

VM locks: one migration per VM. A lock is taken with an expiry and made
permanent, atomically, when its migration's record is created; so a request
that died in between leaves a lock that lapses by itself. A lock whose
migration is finished, or a permanent one naming no record, counts as free.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Collection, Mapping
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.typing import EncodableT

from appliance.errors import Conflict, IncorrectState
from appliance.state.events import GLOBAL_MAXLEN, MIGRATION_MAXLEN
from appliance.state.leases import FENCE_CHECK, Lease, check_fenced, fence_keys, fence_token
from appliance.state.store import StateStore, text

# KEYS: lease, fence, record, counts, events, migration events.
# ARGV: token, expected step, new step, old public, new public, json, then (optional) the
# event: global maxlen, migration maxlen, field/value pairs. 0: wrong step, -1: fenced out.
_TRANSITION = (
    FENCE_CHECK
    + """
if redis.call('HGET', KEYS[3], 'step') ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[3], 'step', ARGV[3], 'public', ARGV[5], 'record', ARGV[6])
if ARGV[4] ~= ARGV[5] then
  redis.call('HINCRBY', KEYS[4], ARGV[4], -1)
  redis.call('HINCRBY', KEYS[4], ARGV[5], 1)
end
if #ARGV > 8 then
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[7], '*', unpack(ARGV, 9))
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[8], '*', unpack(ARGV, 9))
end
return 1
"""
)

# A VM lock names the migration holding the VM. It is taken with an expiry ("pending")
# and made permanent only when the migration's record is created (``_CREATE_GROUP``), so a
# request that dies between the two leaves no lock behind for longer than the expiry.
# A lock whose migration is finished, or that is permanent but names no record, is free.
# KEYS: vm lock. ARGV: migration id, pending ms, record key prefix, finished steps...
# Returns the holder (ours when we got it).
_LOCK = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  if ARGV[2] == '0' then
    redis.call('PERSIST', KEYS[1])
  elseif redis.call('PTTL', KEYS[1]) > 0 then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
  end
  return holder
end
if holder then
  local record = ARGV[3] .. holder
  local step = redis.call('HGET', record, 'step')
  local free = false
  if step then
    for i = 4, #ARGV do
      if step == ARGV[i] then
        free = true
      end
    end
  else
    free = redis.call('PTTL', KEYS[1]) == -1
  end
  if not free then
    return holder
  end
end
if ARGV[2] == '0' then
  redis.call('SET', KEYS[1], ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return ARGV[1]
"""

# KEYS: vm lock. ARGV: migration id. Drops the lock only while it is still pending.
_RELEASE_PENDING = """
if redis.call('GET', KEYS[1]) == ARGV[1] and redis.call('PTTL', KEYS[1]) > 0 then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS: group, migrations zset, counts, active groups, then one record per member, then
# (when ARGV[5] is not 0) one VM lock per member, made permanent here. ARGV: group id,
# request id, members JSON, admission, number of locks, then 4 per member.
# Returns 1 (created), 0 (the group exists), -1 (a member's lock is another migration's).
_CREATE_GROUP = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
local members = (#ARGV - 5) / 4
local locks = tonumber(ARGV[5])
for i = 1, locks do
  local holder = redis.call('GET', KEYS[4 + members + i])
  if holder and holder ~= ARGV[6 + (i - 1) * 4] then
    return -1
  end
end
local admission = tonumber(ARGV[4])
for i = 1, members do
  local base = 6 + (i - 1) * 4
  redis.call('HSET', KEYS[4 + i], 'step', ARGV[base + 1], 'public', ARGV[base + 2],
             'record', ARGV[base + 3])
  redis.call('ZADD', KEYS[2], admission, ARGV[base])
  redis.call('HINCRBY', KEYS[3], ARGV[base + 2], 1)
  if i <= locks then
    redis.call('SET', KEYS[4 + members + i], ARGV[base])
  end
end
redis.call('HSET', KEYS[1], 'request_id', ARGV[2], 'members', ARGV[3], 'admission', admission)
redis.call('ZADD', KEYS[4], admission, ARGV[1])
return 1
"""

# KEYS: lease, fence, vm lock. ARGV: token, migration id.
_UNLOCK = (
    FENCE_CHECK
    + """
if redis.call('GET', KEYS[3]) == ARGV[2] then
  return redis.call('DEL', KEYS[3])
end
return 0
"""
)

# KEYS: lease, fence, key. ARGV: token.
_DELETE = (
    FENCE_CHECK
    + """
return redis.call('DEL', KEYS[3])
"""
)


@dataclass(frozen=True, slots=True)
class StoredMigration:
    migration_id: str
    step: str
    public: str
    record: str
    cancel_requested: bool


@dataclass(frozen=True, slots=True)
class NewMigration:
    migration_id: str
    step: str
    public: str
    record: str
    vm_lock: tuple[str, str] | None = None
    """(site, vm id) of the lock this migration took: made permanent with the record."""


@dataclass(frozen=True, slots=True)
class GroupInfo:
    group_id: str
    request_id: str
    members: tuple[str, ...]
    admission: int


class MigrationStore:
    def __init__(self, store: StateStore) -> None:
        self._store = store
        self._keys = store.keys
        self._transition = store.redis.register_script(_TRANSITION)
        self._lock = store.redis.register_script(_LOCK)
        self._release_pending = store.redis.register_script(_RELEASE_PENDING)
        self._unlock = store.redis.register_script(_UNLOCK)
        self._delete = store.redis.register_script(_DELETE)
        self._create_group = store.redis.register_script(_CREATE_GROUP)

    # --- creation ---------------------------------------------------------------

    async def next_admission(self) -> int:
        return int(await self._store.run(lambda r: r.incr(self._keys.admission)))

    async def create_group(
        self, group_id: str, request_id: str, admission: int, members: list[NewMigration]
    ) -> bool:
        """Create a group and its migrations in one atomic step, unless the group exists.

        Returns False (and changes nothing) when an earlier or concurrent delivery of
        the same request already made it. The members' VM locks (all or none of them
        carry one) become permanent with the records; Conflict if one is no longer theirs.
        """
        locks = [m.vm_lock for m in members if m.vm_lock is not None]
        if locks and len(locks) != len(members):
            raise ValueError("either every member of a group names its VM lock or none does")
        keys = [
            self._keys.group(group_id),
            self._keys.migrations,
            self._keys.migration_counts,
            self._keys.active_groups,
            *(self._keys.migration(m.migration_id) for m in members),
            *(self._keys.vm_lock(site, vm_id) for site, vm_id in locks),
        ]
        args: list[EncodableT] = [
            group_id,
            request_id,
            json.dumps([m.migration_id for m in members]),
            admission,
            len(locks),
        ]
        for member in members:
            args += [member.migration_id, member.step, member.public, member.record]
        created = int(
            await self._store.run(lambda r: self._create_group(keys=keys, args=args, client=r))
        )
        if created == -1:
            raise Conflict(f"a VM lock of group {group_id} lapsed and another migration took it")
        return created == 1

    async def claim_request(self, request_id: str, migration_ids: list[str]) -> list[str]:
        """Record which migrations a request made; return the ids recorded first (idempotency)."""
        key = self._keys.request(request_id)
        await self._store.run(lambda r: r.set(key, json.dumps(migration_ids), nx=True))
        return await self.request(request_id) or migration_ids

    async def request(self, request_id: str) -> list[str] | None:
        raw = await self._store.run(lambda r: r.get(self._keys.request(request_id)))
        return list(json.loads(text(raw))) if raw is not None else None

    async def lock_vm(
        self,
        site: str,
        vm_id: str,
        migration_id: str,
        *,
        pending_s: float | None,
        finished: Collection[str],
    ) -> str:
        """Take the VM for ``migration_id``; returns the holder (ours when we got it).

        The lock lapses after ``pending_s`` unless the migration's record is created
        first; ``None`` takes it for good (the record exists already: a resume). A lock
        held by a migration whose step is in ``finished`` is taken over.
        """
        key = self._keys.vm_lock(site, vm_id)
        args: list[EncodableT] = [
            migration_id,
            0 if pending_s is None else max(1, int(pending_s * 1000)),
            self._keys.migration(""),
            *finished,
        ]
        holder = await self._store.run(lambda r: self._lock(keys=[key], args=args, client=r))
        return text(holder)

    async def release_pending_lock(self, site: str, vm_id: str, migration_id: str) -> None:
        """Drop our lock if its migration was never created (a lock made permanent stays)."""
        key = self._keys.vm_lock(site, vm_id)
        await self._store.run(
            lambda r: self._release_pending(keys=[key], args=[migration_id], client=r)
        )

    async def note_latest(self, site: str, vm_id: str, migration_id: str) -> None:
        """Remember ``migration_id`` as the VM's latest migration (inventory shows its state)."""
        latest = self._keys.vm_latest(site, vm_id)
        await self._store.run(lambda r: r.set(latest, migration_id))

    async def lock_holder(self, site: str, vm_id: str) -> str | None:
        holder = await self._store.run(lambda r: r.get(self._keys.vm_lock(site, vm_id)))
        return text(holder) if holder is not None else None

    async def unlock_vm(
        self, site: str, vm_id: str, migration_id: str, lease: Lease | None = None
    ) -> None:
        """Release the VM if ``migration_id`` holds it; fenced by the owner's ``lease``."""
        keys = [*fence_keys(self._keys, lease), self._keys.vm_lock(site, vm_id)]
        await self._fenced(self._unlock, keys, lease, migration_id)

    async def delete_secret(self, migration_id: str, lease: Lease | None = None) -> None:
        """Drop a migration's sealed credentials; fenced by the owner's ``lease``."""
        keys = [*fence_keys(self._keys, lease), self._keys.secret(migration_id)]
        await self._fenced(self._delete, keys, lease)

    async def _fenced(
        self, script: AsyncScript, keys: list[str], lease: Lease | None, *args: EncodableT
    ) -> object:
        def call(r: Redis) -> Awaitable[object]:
            return script(keys=keys, args=[fence_token(lease), *args], client=r)

        result = await self._store.run(call)
        check_fenced(result, lease)
        return result

    # --- reading ----------------------------------------------------------------

    async def get(self, migration_id: str) -> StoredMigration | None:
        raw = await self._store.run(lambda r: r.hgetall(self._keys.migration(migration_id)))
        return _stored(migration_id, raw) if raw and b"record" in raw else None

    async def get_many(self, migration_ids: list[str]) -> list[StoredMigration]:
        keys = self._keys

        async def read(r: Redis) -> list[dict[bytes | str, bytes | str]]:
            async with r.pipeline(transaction=False) as pipe:
                for migration_id in migration_ids:
                    pipe.hgetall(keys.migration(migration_id))
                result: list[dict[bytes | str, bytes | str]] = await pipe.execute()
                return result

        rows = await self._store.run(read)
        return [
            _stored(migration_id, raw)
            for migration_id, raw in zip(migration_ids, rows, strict=True)
            if raw and b"record" in raw
        ]

    async def latest_states(self, site: str, vm_ids: list[str]) -> dict[str, str]:
        """The public state of each VM's latest migration, by VM id; VMs never migrated omitted."""
        keys = self._keys

        async def read(r: Redis) -> dict[str, str]:
            async with r.pipeline(transaction=False) as pipe:
                for vm_id in vm_ids:
                    pipe.get(keys.vm_latest(site, vm_id))
                latest: list[bytes | None] = await pipe.execute()
            found = {v: text(m) for v, m in zip(vm_ids, latest, strict=True) if m is not None}
            async with r.pipeline(transaction=False) as pipe:
                for migration_id in found.values():
                    pipe.hget(keys.migration(migration_id), "public")
                public: list[bytes | None] = await pipe.execute()
            return {v: text(p) for v, p in zip(found, public, strict=True) if p is not None}

        if not vm_ids:
            return {}
        return await self._store.run(read)

    async def page(self, offset: int, count: int) -> list[str]:
        """Migration ids in admission order."""
        end = offset + count - 1
        ids = await self._store.run(lambda r: r.zrange(self._keys.migrations, offset, end))
        return [text(i) for i in ids if isinstance(i, bytes | str)]

    async def counts(self) -> dict[str, int]:
        raw = await self._store.run(lambda r: r.hgetall(self._keys.migration_counts))
        return {text(k): int(v) for k, v in raw.items() if int(v) > 0}

    async def group(self, group_id: str) -> GroupInfo | None:
        raw = await self._store.run(lambda r: r.hgetall(self._keys.group(group_id)))
        if not raw:
            return None
        fields = {text(k): text(v) for k, v in raw.items()}
        return GroupInfo(
            group_id=group_id,
            request_id=fields["request_id"],
            members=tuple(json.loads(fields["members"])),
            admission=int(fields["admission"]),
        )

    async def active_groups(self) -> list[str]:
        ids = await self._store.run(lambda r: r.zrange(self._keys.active_groups, 0, -1))
        return [text(i) for i in ids if isinstance(i, bytes | str)]

    # --- changing ---------------------------------------------------------------

    async def transition(
        self,
        migration_id: str,
        *,
        expected: str,
        step: str,
        old_public: str,
        public: str,
        record: str,
        lease: Lease | None,
        event: Mapping[str, str] | None = None,
    ) -> None:
        """Set ``step`` if the record is still at ``expected`` and ``lease`` is current.

        ``event`` (a stream entry) is appended to the global and the migration's event
        log in the same atomic step, so a step is logged exactly when it is stored.
        """
        keys = [
            *fence_keys(self._keys, lease),
            self._keys.migration(migration_id),
            self._keys.migration_counts,
            self._keys.events,
            self._keys.migration_events(migration_id),
        ]
        args: list[EncodableT] = [expected, step, old_public, public, record]
        if event is not None:
            args += [GLOBAL_MAXLEN, MIGRATION_MAXLEN]
            for name, value in event.items():
                args += [name, value]
        result = await self._fenced(self._transition, keys, lease, *args)
        if result == 0:
            current = await self.get(migration_id)
            raise IncorrectState(
                f"migration {migration_id}", current.step if current else "(none)", step
            )

    async def request_cancel(self, migration_id: str) -> None:
        key = self._keys.migration(migration_id)
        await self._store.run(lambda r: r.hset(key, "cancel", "1"))

    async def ask(self, migration_id: str, what: str, value: str) -> None:
        """Ask a migration's run for something (``ask:<what>``; a migrate back, its options)."""
        key = self._keys.migration(migration_id)
        await self._store.run(lambda r: r.hset(key, f"ask:{what}", value))

    async def ask_count(self, migration_id: str, what: str) -> int:
        """Ask once more (``ask:<what>`` counts the asks, e.g. syncs); the new count."""
        key = self._keys.migration(migration_id)
        return int(await self._store.run(lambda r: r.hincrby(key, f"ask:{what}", 1)))

    async def asks(self, migration_id: str) -> dict[str, str]:
        """What has been asked of a migration's run (``what`` -> value)."""
        raw = await self._store.run(lambda r: r.hgetall(self._keys.migration(migration_id)))
        prefix = "ask:"
        found = {text(k): text(v) for k, v in raw.items()}
        return {k[len(prefix) :]: v for k, v in found.items() if k.startswith(prefix)}

    async def requeue_group(self, group_id: str, admission: int) -> None:
        """Make a finished group active again, at the back of the line (a resume)."""
        group_key, active = self._keys.group(group_id), self._keys.active_groups

        async def write(r: Redis) -> None:
            async with r.pipeline(transaction=True) as pipe:
                pipe.hset(group_key, "admission", admission)
                pipe.zadd(active, {group_id: admission})
                await pipe.execute()

        await self._store.run(write)

    async def finish_group(self, group_id: str) -> None:
        await self._store.run(lambda r: r.zrem(self._keys.active_groups, group_id))


def _stored(migration_id: str, raw: dict[bytes | str, bytes | str]) -> StoredMigration:
    fields = {text(k): text(v) for k, v in raw.items()}
    return StoredMigration(
        migration_id=migration_id,
        step=fields.get("step", ""),
        public=fields.get("public", ""),
        record=fields["record"],
        cancel_requested=fields.get("cancel") == "1",
    )
