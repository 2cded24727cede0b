"""Policies set by SetPolicyRequest: per cluster, with a default, over the settings.

A migration's policy is the default overlaid with its source cluster's own
policy, then its target cluster's (the more specific wins); see
:meth:`Policies.for_clusters`. What no policy sets comes from the settings
(:class:`PolicyDefaults`). Every value is read where it acts, afresh: the
bandwidth cap by running transfers every progress interval, the limits by the
scheduler on every tick (:meth:`Policies.limits`), the RTO/RPO interval and
the dirty-bytes threshold by the try-before-commit and warm workflows while a
VM rests in the cloud (:meth:`Policies.rpo`), so a policy set is a policy used.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from appliance.state.store import Fields, StateStore, text


@dataclass(frozen=True, slots=True)
class Policy:
    rto_rpo_interval_s: int | None = None
    rpo_dirty_bytes: int | None = None
    max_concurrent_migrations: int | None = None
    """Cold migrations in progress (default policy: on the appliance; a cluster's: those
    touching the cluster)."""
    max_in_progress_per_cache_node: int | None = None
    """Warm and try-before-commit migrations in progress on one cache node."""
    max_resting_per_cache_node: int | None = None
    """VMs resting in the cloud (warm and try-before-commit) on one cache node."""
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


@dataclass(frozen=True, slots=True)
class PolicyDefaults:
    """What holds where no policy says otherwise: HDM's values, or the settings'."""

    rto_rpo_interval_s: int = 1200
    rpo_dirty_bytes: int = 10 * 10**9
    max_concurrent_migrations: int = 8
    max_in_progress_per_cache_node: int = 4
    max_resting_per_cache_node: int = 20

    def as_policy(self) -> Policy:
        return Policy(**{f.name: getattr(self, f.name) for f in fields(self)})


@dataclass(frozen=True, slots=True)
class RpoPolicy:
    """When a VM resting in the cloud cuts its next flush epoch."""

    interval_s: int
    """An epoch at least this often (the RTO/RPO interval)."""
    dirty_bytes: int
    """An epoch as soon as this much is dirty in the cache."""


@dataclass(frozen=True, slots=True)
class Limits:
    """The scheduler's three limits, as they hold for one migration now."""

    cold_in_progress: int
    cache_in_progress: int
    """Warm and try-before-commit migrations in progress per cache node."""
    cache_resting: int
    """VMs resting in the cloud per cache node."""


MBPS = 125_000
"""Bytes per second in one megabit per second."""


def lower_cap(*caps: float | None) -> float | None:
    """The strictest of several bandwidth caps; None (uncapped) when none is set."""
    given = [cap for cap in caps if cap is not None]
    return min(given) if given else None


_CASTS = {
    "rto_rpo_interval_s": int,
    "rpo_dirty_bytes": int,
    "max_concurrent_migrations": int,
    "max_in_progress_per_cache_node": int,
    "max_resting_per_cache_node": int,
    "bandwidth_cap_mbps": float,
}


class Policies:
    def __init__(self, store: StateStore, defaults: PolicyDefaults | None = None) -> None:
        self._store = store
        self.defaults = defaults or PolicyDefaults()

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

    async def effective(self, *clusters: str | None) -> Policy:
        """:meth:`for_clusters` over the defaults: every value but the bandwidth cap is set."""
        return self.defaults.as_policy().overlaid(await self.for_clusters(*clusters))

    async def rpo(self, *clusters: str | None) -> RpoPolicy:
        """The RTO/RPO interval and dirty-bytes threshold for a VM of these clusters (its
        source's, then its target's): a cluster's policy, else the default policy, else
        the settings. Read it afresh before each wait: a change applies at once."""
        policy = await self.effective(*clusters)
        assert policy.rto_rpo_interval_s is not None and policy.rpo_dirty_bytes is not None
        return RpoPolicy(policy.rto_rpo_interval_s, policy.rpo_dirty_bytes)

    async def limits(self, *clusters: str | None) -> Limits:
        """The limits for a migration of these clusters; ``limits()``: the appliance's."""
        policy = await self.effective(*clusters)
        assert policy.max_concurrent_migrations is not None
        assert policy.max_in_progress_per_cache_node is not None
        assert policy.max_resting_per_cache_node is not None
        return Limits(
            policy.max_concurrent_migrations,
            policy.max_in_progress_per_cache_node,
            policy.max_resting_per_cache_node,
        )

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
