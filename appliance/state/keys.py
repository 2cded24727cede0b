"""The Redis key layout, in one place so every writer agrees on it.

All keys start with the configured prefix (``ferry`` by default; tests use a
random one)::

    {p}:generation                  string  set at first start; missing later = Redis lost its data
    {p}:cmd:{message_id}            hash    command record: digest, type, status (idempotency)
    {p}:request:{request_id}        string  migration ids a request created (idempotency by request)
    {p}:migration:{id}              hash    migration record and its state-machine state
    {p}:migrations                  zset    every migration id, scored by creation time
    {p}:migration-counts            hash    public state -> number of migrations in it
    {p}:group:{id}                  hash    a dependency group: members, request, admission order
    {p}:groups:active               zset    groups not yet finished, scored by admission order
    {p}:admission                   string  counter handing out admission order
    {p}:secret:{migration_id}       string  guest credentials, sealed by the client, until prepare
    {p}:vm-lock:{site}:{vm_id}      string  migration id holding the VM (one migration per VM);
                                            expires until its migration record exists
    {p}:vm-latest:{site}:{vm_id}    string  the VM's latest migration id (inventory shows its state)
    {p}:lease:{id}                  hash    owner, fencing token, expiry of a migration's driver
                                            (the key itself expires with the lease)
    {p}:fence:{id}                  hash    "token": last fencing token handed out (never
                                            expires); "accepted:<t>"/"refused:<t>": fenced
                                            writes made with token t
    {p}:checkpoint:{transfer_id}    hash    chunk index -> "epoch:hash" of chunks done; "meta",
                                            "durable" (flushed epoch), "complete" (image digest)
    {p}:events                      stream  global event log
    {p}:events:{migration_id}       stream  one migration's event log
    {p}:component:{kind}/{name}     hash    component heartbeat (its orders, outcomes and streams:
                                            appliance/components/orders.py)
    {p}:policy:{cluster|default}    hash    RTO/RPO interval, limits
    {p}:seen:{message_id}           string  replay guard, kept for twice the clock skew
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    @property
    def generation(self) -> str:
        return self._key("generation")

    def command(self, message_id: str) -> str:
        return self._key("cmd", message_id)

    def request(self, request_id: str) -> str:
        return self._key("request", request_id)

    def migration(self, migration_id: str) -> str:
        return self._key("migration", migration_id)

    @property
    def migrations(self) -> str:
        return self._key("migrations")

    @property
    def migration_counts(self) -> str:
        return self._key("migration-counts")

    def group(self, group_id: str) -> str:
        return self._key("group", group_id)

    @property
    def active_groups(self) -> str:
        return self._key("groups", "active")

    @property
    def admission(self) -> str:
        return self._key("admission")

    def secret(self, migration_id: str) -> str:
        return self._key("secret", migration_id)

    def vm_lock(self, site: str, vm_id: str) -> str:
        return self._key("vm-lock", site, vm_id)

    def vm_latest(self, site: str, vm_id: str) -> str:
        return self._key("vm-latest", site, vm_id)

    def lease(self, resource: str) -> str:
        return self._key("lease", resource)

    def fence(self, resource: str) -> str:
        return self._key("fence", resource)

    def checkpoint(self, transfer_id: str) -> str:
        return self._key("checkpoint", transfer_id)

    @property
    def events(self) -> str:
        return self._key("events")

    def migration_events(self, migration_id: str) -> str:
        return self._key("events", migration_id)

    def component(self, name: str) -> str:
        return self._key("component", name)

    def policy(self, cluster: str | None) -> str:
        return self._key("policy", cluster or "default")

    def seen(self, message_id: str) -> str:
        return self._key("seen", message_id)

    @property
    def pattern(self) -> str:
        """Matches every key of this prefix (for reset and test cleanup)."""
        return self._key("*")
