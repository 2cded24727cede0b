"""Policies set by SetPolicyRequest: per cluster, with a default.

A migration's policy is the default overlaid with its source cluster's own
policy, then its target cluster's (the more specific wins); see
:meth:`Policies.for_clusters`. The bandwidth cap is read by running
transfers every progress interval, the concurrency limit by the scheduler on
every tick, so a policy set is a policy used.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from appliance.state.store import Fields, StateStore, text


@dataclass(frozen=True, slots=True)
class Policy:
    rto_rpo_interval_s: int | None = None
    max_concurrent_migrations: int | None = None
    bandwidth_cap_mbps: float | None = None

    def overlaid(self, other: Policy) -> Policy:
        """``other``'s values where it has them, ours elsewhere."""
        changes = {
            f.name: getattr(other, f.name)
            for f in fields(other)
            if getattr(other, f.name) is not None
        }
        return replace(self, **changes)

    def as_dict(self) -> dict[str, float | int | str | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


MBPS = 125_000
"""Bytes per second in one megabit per second."""


def lower_cap(*caps: float | None) -> float | None:
    """The strictest of several bandwidth caps; None (uncapped) when none is set."""
    given = [cap for cap in caps if cap is not None]
    return min(given) if given else None


_CASTS = {"rto_rpo_interval_s": int, "max_concurrent_migrations": int, "bandwidth_cap_mbps": float}


class Policies:
    def __init__(self, store: StateStore) -> None:
        self._store = store

    async def get(self, cluster: str | None = None) -> Policy:
        """The default policy, overlaid with the cluster's own when asked for one."""
        policy = await self._read(None)
        return policy.overlaid(await self._read(cluster)) if cluster else policy

    async def own(self, cluster: str) -> Policy:
        """Only what was set for this cluster (not overlaid with the default)."""
        return await self._read(cluster)

    async def for_clusters(self, *clusters: str | None) -> Policy:
        """The default, overlaid with each named cluster's own policy in turn (later wins)."""
        policy = await self._read(None)
        for cluster in clusters:
            if cluster:
                policy = policy.overlaid(await self._read(cluster))
        return policy

    async def _read(self, cluster: str | None) -> Policy:
        key = self._store.keys.policy(cluster)
        raw = await self._store.run(lambda r: r.hgetall(key))
        values = {text(k): text(v) for k, v in raw.items()}
        return Policy(
            **{name: cast(values[name]) for name, cast in _CASTS.items() if name in values}
        )

    async def set(self, cluster: str | None, policy: Policy) -> Policy:
        key = self._store.keys.policy(cluster)
        mapping: Fields = {
            name: str(value) for name, value in policy.as_dict().items() if value is not None
        }
        if mapping:
            await self._store.run(lambda r: r.hset(key, mapping=mapping))
        return await self.get(cluster)
