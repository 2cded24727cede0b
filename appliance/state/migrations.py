"""Migration records in Redis: created together per group, changed by compare-and-set.

The state layer does not know the orchestrator's states: a record is stored
as its ``step`` (the state-machine state, compared and set atomically), its
``public`` state (what clients see; counted in ``{p}:migration-counts``), a
JSON ``record`` the orchestrator owns, and a ``cancel`` flag any process may
raise. Every write of a step or record is fenced by the writer's lease token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.typing import EncodableT

from appliance.errors import IncorrectState, LeaseLost
from appliance.state.store import StateStore, text

# KEYS: record, lease, counts. ARGV: expected step, new step, old public, new public, json, token
_TRANSITION = """
if ARGV[6] ~= '' and redis.call('HGET', KEYS[2], 'token') ~= ARGV[6] then
  return -1
end
if redis.call('HGET', KEYS[1], 'step') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'step', ARGV[2], 'public', ARGV[4], 'record', ARGV[5])
if ARGV[3] ~= ARGV[4] then
  redis.call('HINCRBY', KEYS[3], ARGV[3], -1)
  redis.call('HINCRBY', KEYS[3], ARGV[4], 1)
end
return 1
"""

# KEYS: vm lock. ARGV: migration id. Returns the holder (ours when we got it).
_LOCK = """
local holder = redis.call('GET', KEYS[1])
if not holder then
  redis.call('SET', KEYS[1], ARGV[1])
  return ARGV[1]
end
return holder
"""

# KEYS: group, migrations zset, counts, active groups, then one record per member.
# ARGV: group id, request id, members JSON, admission, then 4 per member.
_CREATE_GROUP = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
local admission = tonumber(ARGV[4])
for i = 5, #KEYS do
  local base = 5 + (i - 5) * 4
  redis.call('HSET', KEYS[i], 'step', ARGV[base + 1], 'public', ARGV[base + 2],
             'record', ARGV[base + 3])
  redis.call('ZADD', KEYS[2], admission, ARGV[base])
  redis.call('HINCRBY', KEYS[3], ARGV[base + 2], 1)
end
redis.call('HSET', KEYS[1], 'request_id', ARGV[2], 'members', ARGV[3], 'admission', admission)
redis.call('ZADD', KEYS[4], admission, ARGV[1])
return 1
"""

_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


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
        self._unlock = store.redis.register_script(_UNLOCK)
        self._create_group = store.redis.register_script(_CREATE_GROUP)

    # --- creation ---------------------------------------------------------------

    async def next_admission(self) -> int:
        return int(await self._store.run(lambda r: r.incr(self._keys.admission)))

    async def create_group(
        self, group_id: str, request_id: str, admission: int, members: list[NewMigration]
    ) -> bool:
        """Create a group and its migrations in one atomic step, unless the group exists.

        Returns False (and changes nothing) when an earlier or concurrent delivery of
        the same request already made it.
        """
        keys = [
            self._keys.group(group_id),
            self._keys.migrations,
            self._keys.migration_counts,
            self._keys.active_groups,
            *(self._keys.migration(m.migration_id) for m in members),
        ]
        args: list[EncodableT] = [
            group_id,
            request_id,
            json.dumps([m.migration_id for m in members]),
            admission,
        ]
        for member in members:
            args += [member.migration_id, member.step, member.public, member.record]
        created = await self._store.run(
            lambda r: self._create_group(keys=keys, args=args, client=r)
        )
        return int(created) == 1

    async def claim_request(self, request_id: str, migration_ids: list[str]) -> list[str]:
        """Record which migrations a request made; return the ids recorded first (idempotency)."""
        key = self._keys.request(request_id)
        await self._store.run(lambda r: r.set(key, json.dumps(migration_ids), nx=True))
        return await self.request(request_id) or migration_ids

    async def request(self, request_id: str) -> list[str] | None:
        raw = await self._store.run(lambda r: r.get(self._keys.request(request_id)))
        return list(json.loads(text(raw))) if raw is not None else None

    async def lock_vm(self, site: str, vm_id: str, migration_id: str) -> str:
        key = self._keys.vm_lock(site, vm_id)
        holder = await self._store.run(
            lambda r: self._lock(keys=[key], args=[migration_id], client=r)
        )
        return text(holder)

    async def note_latest(self, site: str, vm_id: str, migration_id: str) -> None:
        """Remember ``migration_id`` as the VM's latest migration (inventory shows its state)."""
        latest = self._keys.vm_latest(site, vm_id)
        await self._store.run(lambda r: r.set(latest, migration_id))

    async def lock_holder(self, site: str, vm_id: str) -> str | None:
        holder = await self._store.run(lambda r: r.get(self._keys.vm_lock(site, vm_id)))
        return text(holder) if holder is not None else None

    async def unlock_vm(self, site: str, vm_id: str, migration_id: str) -> None:
        key = self._keys.vm_lock(site, vm_id)
        await self._store.run(lambda r: self._unlock(keys=[key], args=[migration_id], client=r))

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
        lease_resource: str,
        token: int | None,
    ) -> None:
        """Set ``step`` if the record is still at ``expected`` and our lease is current."""
        keys = [
            self._keys.migration(migration_id),
            self._keys.lease(lease_resource),
            self._keys.migration_counts,
        ]
        args: list[EncodableT] = [
            expected,
            step,
            old_public,
            public,
            record,
            "" if token is None else str(token),
        ]
        result = int(
            await self._store.run(lambda r: self._transition(keys=keys, args=args, client=r))
        )
        if result == -1:
            raise LeaseLost(lease_resource, token or 0)
        if result == 0:
            current = await self.get(migration_id)
            raise IncorrectState(
                f"migration {migration_id}", current.step if current else "(none)", step
            )

    async def request_cancel(self, migration_id: str) -> None:
        key = self._keys.migration(migration_id)
        await self._store.run(lambda r: r.hset(key, "cancel", "1"))

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
