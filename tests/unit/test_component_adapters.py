"""The component adapters' answers to orders they cannot carry out, in process, real Redis."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.asyncio as aioredis
from pydantic import SecretStr

from appliance.components.cache_runtime import CacheRuntime
from appliance.components.onprem_runtime import OnpremRuntime
from appliance.components.orders import (
    ComponentId,
    Order,
    OrderAction,
    OutcomeCode,
    OutcomeKind,
)
from appliance.components.runtimes import ComponentConfig, runtime_for_kind
from appliance.embedded import RedisServer
from appliance.errors import DiskNotOpen
from appliance.settings import Settings
from appliance.state.keys import Keys
from tests.support.onprem import MIB, make_lab_disk


def config(kind: str, data_dir: Path, redis_server: RedisServer, keys: Keys) -> ComponentConfig:
    return ComponentConfig(
        ComponentId(kind, f"{kind}-1"), data_dir, "127.0.0.1", 0,
        redis_server.url, keys.prefix, 1.0, 3.0, 30.0,
        Settings(redis_url=SecretStr(redis_server.url), cache_scale=1 / 1024),
    )  # fmt: skip


def order(action: OrderAction, request: int = 0, **params: str | int) -> Order:
    return Order("disk-1", action, "m-1", 2, "group:g-1", request, params=params)


def test_both_kinds_have_a_runtime() -> None:
    assert runtime_for_kind("cache").__name__ == "make_runtime"
    assert runtime_for_kind("cache").__module__ == "appliance.components.cache_runtime"
    assert runtime_for_kind("onprem").__module__ == "appliance.components.onprem_runtime"


async def test_the_onprem_adapter_refuses_cuts_and_opens_without_a_disk(
    redis: aioredis.Redis, redis_server: RedisServer, keys: Keys, tmp_path: Path
) -> None:
    snapshot_id, _ = await make_lab_disk(tmp_path / "lab", 1 * MIB)
    async with OnpremRuntime(config("onprem", tmp_path / "o", redis_server, keys)) as runtime:
        cut = await runtime.apply(order(OrderAction.CUT_EPOCH, 1))
        assert (cut.kind, cut.code) == (OutcomeKind.REFUSED, OutcomeCode.INVALID)
        bare = await runtime.apply(order(OrderAction.OPEN))
        assert (bare.kind, bare.code) == (OutcomeKind.REFUSED, OutcomeCode.INVALID)
        assert "disk_dir" in bare.reason
        opened = await runtime.apply(
            order(OrderAction.OPEN, disk_dir=str(tmp_path / "lab"), snapshot_id=snapshot_id)
        )
        assert opened.kind is OutcomeKind.APPLIED
        assert opened.result["current"] == "cur/disk-1"
        figures = runtime.status()
        assert figures["exports"] == ["cur/disk-1", "snap/disk-1"]
        assert figures["committed_epoch"] == {"disk-1": 0}
        closed = await runtime.apply(order(OrderAction.CLOSE))
        assert closed.kind is OutcomeKind.APPLIED and runtime.status()["exports"] == []


async def test_the_cache_adapter_refuses_an_open_without_its_params_and_a_cut_of_no_disk(
    redis: aioredis.Redis, redis_server: RedisServer, keys: Keys, tmp_path: Path
) -> None:
    async with CacheRuntime(config("cache", tmp_path / "c", redis_server, keys)) as runtime:
        bare = await runtime.apply(order(OrderAction.OPEN, size=MIB))
        assert (bare.kind, bare.code) == (OutcomeKind.REFUSED, OutcomeCode.INVALID)
        assert "upstream" in bare.reason
        bad = await runtime.apply(
            order(OrderAction.OPEN, size=MIB, upstream="nowhere", onprem="onprem-1")
        )
        assert (bad.kind, bad.code) == (OutcomeKind.REFUSED, OutcomeCode.INVALID)
        with pytest.raises(DiskNotOpen):
            await runtime.apply(order(OrderAction.CUT_EPOCH, 1))
        assert runtime.status()["exports"] == []
