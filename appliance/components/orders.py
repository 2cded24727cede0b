"""What travels on a component's control channel: orders, outcomes, and where they live.

An *instance* is one component process, named ``{kind}/{name}`` (``cache/cache-1``,
``onprem/onprem-1``). Its keys (``{p}`` is the Redis prefix)::

    {p}:component:{kind}/{name}                  hash    heartbeat (see heartbeat.py)
    {p}:component-beats:{kind}/{name}            stream  one entry per heartbeat (wakes readers)
    {p}:component-orders:{kind}/{name}           hash    disk id -> desired order (JSON)
    {p}:component-order-events:{kind}/{name}     stream  "order changed" notifications (disk)
    {p}:component-outcomes:{kind}/{name}         hash    disk id -> outcome of its latest order
    {p}:component-outcome-events:{kind}/{name}   stream  "outcome recorded" notifications
    {p}:component-outcomes-refused:{kind}/{name} hash    disk id -> stale outcomes refused

The order and outcome JSON are the wire between hosts: pydantic models, strict,
``extra="forbid"``. Inside, :class:`Order` and :class:`OrderOutcome` are frozen
dataclasses. An order's ``order_id`` is a digest of its content, so the same
order given twice has the same id and is applied once.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from appliance.state.keys import Keys

ParamValue = str | int | float | bool | None
"""What an order's ``params`` and an outcome's ``result`` may hold (JSON scalars)."""

_PART = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
_DISK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


class ComponentKind(StrEnum):
    CACHE = "cache"
    ONPREM = "onprem"


@dataclass(frozen=True, slots=True)
class ComponentId:
    """One component process: its kind and its name (unique per kind)."""

    kind: str
    name: str

    def __post_init__(self) -> None:
        for part in (self.kind, self.name):
            if not _PART.match(part):
                raise ValueError(f"component kind and name must match {_PART.pattern}: {part!r}")

    def __str__(self) -> str:
        return f"{self.kind}/{self.name}"

    @classmethod
    def parse(cls, text: str) -> ComponentId:
        kind, _, name = text.partition("/")
        return cls(kind, name)


@dataclass(frozen=True, slots=True)
class ComponentKeys:
    """The Redis keys of one component instance (layout in the module docstring)."""

    keys: Keys
    instance: ComponentId

    def _key(self, family: str) -> str:
        return f"{self.keys.prefix}:{family}:{self.instance}"

    @property
    def heartbeat(self) -> str:
        return self.keys.component(str(self.instance))

    @property
    def beats(self) -> str:
        return self._key("component-beats")

    @property
    def orders(self) -> str:
        return self._key("component-orders")

    @property
    def order_events(self) -> str:
        return self._key("component-order-events")

    @property
    def outcomes(self) -> str:
        return self._key("component-outcomes")

    @property
    def outcome_events(self) -> str:
        return self._key("component-outcome-events")

    @property
    def outcomes_refused(self) -> str:
        """disk id -> outcomes refused for a stale token (a paused component resumed)."""
        return self._key("component-outcomes-refused")


class OrderAction(StrEnum):
    OPEN = "open"
    CLOSE = "close"
    CUT_EPOCH = "cut_epoch"
    RECONCILE = "reconcile"
    """A cache's reconcile pass to a volume: ``params.pass`` counts them like
    ``epoch_request`` counts cuts (cache_runtime.py)."""


class OutcomeKind(StrEnum):
    APPLIED = "applied"
    REFUSED = "refused"
    FAILED = "failed"
    NOT_IMPLEMENTED = "not_implemented"


class OutcomeCode(StrEnum):
    """Why an order was not applied (empty when it was)."""

    NONE = ""
    STALE_TOKEN = "stale_token"
    INVALID = "invalid"
    ERROR = "error"
    UNAVAILABLE = "unavailable"
    NOT_IMPLEMENTED = "not_implemented"
    DATA_LOST = "data_lost"
    """The disk was served by an earlier run of this component whose data directory is
    gone (its dirty data with it): it is not served again from an empty cache."""


def _frozen(values: Mapping[str, ParamValue]) -> Mapping[str, ParamValue]:
    return MappingProxyType(dict(values))


@dataclass(frozen=True, slots=True)
class Order:
    """The desired state of one disk on one component, as the lease holder last gave it.

    ``epoch_request`` counts the epochs asked for on this disk: a ``cut_epoch`` order
    with a counter above the last one applied cuts one epoch.
    """

    disk_id: str
    action: OrderAction
    migration_id: str
    token: int
    lease: str
    epoch_request: int = 0
    params: Mapping[str, ParamValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _DISK.match(self.disk_id):
            raise ValueError(f"disk id must match {_DISK.pattern}: {self.disk_id!r}")
        if self.token < 1 or self.epoch_request < 0:
            raise ValueError("an order's token is >= 1 and its epoch request >= 0")
        object.__setattr__(self, "params", _frozen(self.params))

    @property
    def order_id(self) -> str:
        """A digest of the order's content: equal orders, equal ids."""
        canonical = json.dumps(self._fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:24]

    def _fields(self) -> dict[str, object]:
        return {
            "disk_id": self.disk_id,
            "action": self.action,
            "migration_id": self.migration_id,
            "token": self.token,
            "lease": self.lease,
            "epoch_request": self.epoch_request,
            "params": dict(self.params),
        }

    def to_json(self) -> str:
        wire = OrderWire.model_validate({"order_id": self.order_id, **self._fields()})
        return wire.model_dump_json()

    @classmethod
    def from_json(cls, raw: str | bytes) -> Order:
        """Parse and check an order; ValueError (pydantic's included) when it is not one."""
        wire = OrderWire.model_validate_json(raw)
        order = cls(
            disk_id=wire.disk_id,
            action=wire.action,
            migration_id=wire.migration_id,
            token=wire.token,
            lease=wire.lease,
            epoch_request=wire.epoch_request,
            params=wire.params,
        )
        if order.order_id != wire.order_id:
            raise ValueError(f"order id {wire.order_id} does not match its content")
        return order


class OrderWire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    order_id: str = Field(pattern=r"^[0-9a-f]{24}$")
    disk_id: str
    action: OrderAction
    migration_id: str = Field(min_length=1, max_length=128)
    token: int = Field(ge=1)
    lease: str = Field(min_length=1, max_length=200)
    epoch_request: int = Field(default=0, ge=0)
    params: dict[str, ParamValue] = Field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class OrderOutcome:
    """What became of one order: applied, refused (stale token), failed, not implemented."""

    order_id: str
    disk_id: str
    kind: OutcomeKind
    token: int
    code: OutcomeCode = OutcomeCode.NONE
    reason: str = ""
    result: Mapping[str, ParamValue] = field(default_factory=dict)
    retryable: bool = False
    at: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "result", _frozen(self.result))
        if not self.at:
            object.__setattr__(self, "at", datetime.now(UTC).isoformat())

    @classmethod
    def applied(cls, order: Order, **result: ParamValue) -> OrderOutcome:
        return cls(order.order_id, order.disk_id, OutcomeKind.APPLIED, order.token, result=result)

    @classmethod
    def refused(cls, order: Order, code: OutcomeCode, reason: str) -> OrderOutcome:
        return cls(order.order_id, order.disk_id, OutcomeKind.REFUSED, order.token, code, reason)

    @classmethod
    def failed(cls, order: Order, reason: str, *, retryable: bool = False) -> OrderOutcome:
        code = OutcomeCode.UNAVAILABLE if retryable else OutcomeCode.ERROR
        return cls(
            order.order_id,
            order.disk_id,
            OutcomeKind.FAILED,
            order.token,
            code,
            reason,
            retryable=retryable,
        )

    @classmethod
    def data_lost(cls, order: Order, reason: str) -> OrderOutcome:
        return cls(
            order.order_id, order.disk_id, OutcomeKind.FAILED, order.token, OutcomeCode.DATA_LOST,
            reason,
        )  # fmt: skip

    @classmethod
    def not_implemented(cls, order: Order, reason: str) -> OrderOutcome:
        return cls(
            order.order_id,
            order.disk_id,
            OutcomeKind.NOT_IMPLEMENTED,
            order.token,
            OutcomeCode.NOT_IMPLEMENTED,
            reason,
        )

    def to_json(self) -> str:
        return OutcomeWire(
            order_id=self.order_id,
            disk_id=self.disk_id,
            outcome=self.kind,
            token=self.token,
            code=self.code,
            reason=self.reason,
            result=dict(self.result),
            retryable=self.retryable,
            at=self.at,
        ).model_dump_json()

    @classmethod
    def from_json(cls, raw: str | bytes) -> OrderOutcome:
        wire = OutcomeWire.model_validate_json(raw)
        return cls(
            wire.order_id,
            wire.disk_id,
            wire.outcome,
            wire.token,
            wire.code,
            wire.reason,
            wire.result,
            wire.retryable,
            wire.at,
        )


class OutcomeWire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    order_id: str
    disk_id: str
    outcome: OutcomeKind
    token: int
    code: OutcomeCode = OutcomeCode.NONE
    reason: str = ""
    result: dict[str, ParamValue] = Field(default_factory=dict)
    retryable: bool = False
    at: str


class ComponentRuntime(Protocol):
    """The data-plane core behind a component process, as the control loop sees it.

    ``apply`` carries out one order and says what became of it; it is called for
    one order at a time. It may raise ``StaleToken`` (refused), a ``TransientError``
    (failed, retried at the next reconcile) or another ``FerryError`` (failed for good).
    ``status`` gives the figures the heartbeat publishes (JSON-able values).
    """

    async def apply(self, order: Order) -> OrderOutcome: ...

    def status(self) -> Mapping[str, object]: ...
