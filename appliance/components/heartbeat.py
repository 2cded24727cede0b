"""Component heartbeats: each component says it is alive, with its figures, every interval.

The component (:class:`HeartbeatWriter`) writes its heartbeat hash
(``{p}:component:{kind}/{name}``) with Redis's own clock (``seen_ms`` from
``TIME``, so hosts need not agree on time), gives it a TTL, and appends an entry
to ``{p}:component-beats:{kind}/{name}`` so readers wake as it lands. The
control plane (:class:`ComponentHealth`) reads it: a component silent for longer
than the timeout is *failed*, whatever its last words were.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from redis.typing import EncodableT

from appliance.components.control import last_stream_id, read_after
from appliance.components.orders import ComponentId, ComponentKeys
from appliance.errors import StateStoreUnavailable
from appliance.logs import get_logger
from appliance.state.store import StateStore, text

log = get_logger(__name__)
BEATS_MAXLEN = 100

# KEYS: heartbeat hash, beats stream. ARGV: ttl_ms, maxlen, field, value, field, value...
_BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local fields = {'seen_ms', tostring(now)}
for i = 3, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'seen_ms', tostring(now))
return now
"""


class BeatState(StrEnum):
    OK = "ok"
    STOPPING = "stopping"


Figures = Callable[[], Mapping[str, object]]


class HeartbeatWriter:
    def __init__(
        self,
        store: StateStore,
        instance: ComponentId,
        figures: Figures,
        *,
        interval_s: float,
        ttl_s: float,
    ) -> None:
        self._store = store
        self.instance = instance
        self._keys = ComponentKeys(store.keys, instance)
        self._figures = figures
        self._interval = interval_s
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._script = store.redis.register_script(_BEAT)
        self._started = datetime.now(UTC).isoformat()
        self.sequence = 0

    async def beat(self, state: BeatState = BeatState.OK) -> None:
        figures = json.dumps(self._safe_figures(), sort_keys=True, default=str)
        fields: dict[str, EncodableT] = {
            "kind": self.instance.kind,
            "name": self.instance.name,
            "state": state.value,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_at": self._started,
            "sequence": self.sequence,
            "interval_s": self._interval,
            "figures": figures,
        }
        args: list[EncodableT] = [self._ttl_ms, BEATS_MAXLEN]
        for key, value in fields.items():
            args += [key, value]
        keys = [self._keys.heartbeat, self._keys.beats]
        await self._store.run(lambda r: self._script(keys=keys, args=args, client=r))
        self.sequence += 1

    def _safe_figures(self) -> dict[str, object]:
        try:
            return dict(self._figures())
        except Exception as error:
            # A core that cannot count is still alive: say so rather than go silent.
            log.exception("component figures unavailable")
            return {"figures_error": f"{type(error).__name__}: {error}"}

    async def run(self, stop: asyncio.Event) -> None:
        """Beat every interval until ``stop``; a last beat says the component is stopping."""
        while not stop.is_set():
            try:
                await self.beat()
            except StateStoreUnavailable as error:
                log.warning("heartbeat not written", error=str(error))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self._interval)
        with contextlib.suppress(StateStoreUnavailable):
            await self.beat(BeatState.STOPPING)


class Liveness(StrEnum):
    OK = "ok"
    STOPPING = "stopping"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class ComponentReport:
    """What the control plane knows of one component from its heartbeat."""

    instance: ComponentId
    liveness: Liveness
    detail: str
    silent_s: float | None
    """Seconds since its last heartbeat (None: none seen, or gone past the TTL)."""
    pid: int | None = None
    host: str = ""
    sequence: int = -1
    figures: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "figures", MappingProxyType(dict(self.figures)))

    @property
    def failed(self) -> bool:
        return self.liveness is Liveness.FAILED


class ComponentHealth:
    """The control plane's reader: last seen, figures, and "silent for the timeout = failed"."""

    def __init__(self, store: StateStore, timeout_s: float) -> None:
        self._store = store
        self.timeout_s = timeout_s

    async def report(self, instance: ComponentId) -> ComponentReport:
        key = ComponentKeys(self._store.keys, instance).heartbeat
        now_s, now_us = await self._store.run(lambda r: r.time())
        raw = await self._store.run(lambda r: r.hgetall(key))
        now_ms = int(now_s) * 1000 + int(now_us) // 1000
        return self._judge(instance, {text(k): text(v) for k, v in raw.items()}, now_ms)

    def _judge(self, instance: ComponentId, beat: dict[str, str], now_ms: int) -> ComponentReport:
        if "seen_ms" not in beat:
            return ComponentReport(instance, Liveness.FAILED, "no heartbeat", None)
        silent_s = max(0.0, (now_ms - int(beat["seen_ms"])) / 1000)
        common: dict[str, Any] = {
            "silent_s": silent_s,
            "pid": int(beat.get("pid", "0")) or None,
            "host": beat.get("host", ""),
            "sequence": int(beat.get("sequence", "-1")),
            "figures": json.loads(beat.get("figures", "{}")),
        }
        if silent_s > self.timeout_s:
            detail = f"no heartbeat for {silent_s:.1f}s (timeout {self.timeout_s:g}s)"
            return ComponentReport(instance, Liveness.FAILED, detail, **common)
        if beat.get("state") == BeatState.STOPPING.value:
            return ComponentReport(instance, Liveness.STOPPING, "stopping", **common)
        return ComponentReport(instance, Liveness.OK, "", **common)

    async def wait_until(
        self,
        instance: ComponentId,
        wanted: Callable[[ComponentReport], bool],
        within_s: float,
    ) -> ComponentReport:
        """The first report ``wanted`` accepts; TimeoutError after ``within_s``.

        Wakes on every heartbeat (a blocking read of the beats stream) and at the
        moment a silent component crosses the timeout; it never polls on a sleep.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        beats = ComponentKeys(self._store.keys, instance).beats
        after = await last_stream_id(self._store, beats)
        while True:
            report = await self.report(instance)
            if wanted(report):
                return report
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"{instance}: still {report.liveness.value} after {within_s}s")
            block = remaining
            if report.silent_s is not None and not report.failed:
                block = min(block, self.timeout_s - report.silent_s + 0.01)
            entries = await read_after(self._store, beats, after, block)
            if entries:
                after = text(entries[-1][0])
