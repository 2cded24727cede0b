"""The control plane's side of reconcile: passes until the remainder is small, and the check.

A warm migration's workflow calls these (no orchestrator import here)::

    disk = ReconcileDisk("disk-1", migration_id, lease.token, lease.resource)
    volume = VolumeTarget(address, export)           # as the cloud site exports the volume
    run = await reconcile_until(orders, disk, volume, threshold=64 << 20, max_passes=10)
    run.passes[-1].remainder_bytes, run.converged, run.next_pass
    # cutover: power the cloud VM off, then the last pass and the whole-image check
    done = await cutover_pass(orders, disk, volume, run.next_pass, cache=address, image=image)
    done.last.chunks, done.check.left_digest   # CertificationFailed if the volume differs

The order (``action: reconcile``) and its outcome::

    params  {"pass": n, "volume": "HOST:PORT" | "unix:/PATH", "volume_export": "...",
             "volume_path": "/PATH" (instead of volume/volume_export), "workers": 4}
    result  {"pass", "mark", "chunks", "bytes", "bytes_written", "fetched_bytes",
             "remainder_chunks", "remainder_bytes", "redone", "seconds"}

``pass`` counts passes like ``epoch_request`` counts cuts: the same number again
answers the same result without copying; a number below the disk's last pass
is refused (``failed``: it is behind). The workflow keeps ``run.next_pass`` in
its record, so a resumed workflow continues the count.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from appliance.clock import SystemClock
from appliance.components.cache.reconcile import DEFAULT_WORKERS, PassResult, VolumeTarget
from appliance.components.control import ComponentOrders
from appliance.components.epochs import parse_address
from appliance.components.orders import Order, OrderAction, OutcomeKind, ParamValue
from appliance.datapath.chunks import ChunkTable
from appliance.datapath.imagecheck import RangeHasher, first_difference, hash_image, image_digest
from appliance.datapath.nbd.backend import NbdBackend
from appliance.datapath.nbd.channel import NbdAddress, UnixAddress
from appliance.datapath.retry import RetryPolicy
from appliance.errors import CertificationFailed, ReconcileFailed, ReconcileUnavailable
from appliance.logs import get_logger
from appliance.storage.backend import Backend

log = get_logger(__name__)

CHECK_CHUNK = 64 << 10
"""The cache's chunk: each block of the check is then wholly in the cache (hashed there) or
wholly not (hashed on-prem, where it lies), so no data crosses the WAN link for it."""
CHECK_MAX_CHUNKS = 1 << 20
"""Above this many chunks (a 64 GiB disk), the check's chunks grow (powers of two) so its
two hash tables stay under 20 MiB each."""


def check_chunk_size(size: int, smallest: int = CHECK_CHUNK) -> int:
    """The check's chunk for a disk of ``size`` bytes: ``smallest``, doubled while the disk
    would have more than CHECK_MAX_CHUNKS of them."""
    chunk = smallest
    while -(-size // chunk) > CHECK_MAX_CHUNKS:
        chunk *= 2
    return chunk


DEFAULT_PASS_TIMEOUT_S = 3600.0


# -- the order's params ----------------------------------------------------------------


def volume_params(volume: VolumeTarget) -> dict[str, ParamValue]:
    if volume.path is not None:
        return {"volume_path": str(volume.path)}
    return {"volume": str(volume.address), "volume_export": volume.export}


def parse_volume(params: Mapping[str, ParamValue]) -> VolumeTarget | str:
    """The volume a reconcile order names, or why its params do not name one."""
    address, export, path = (
        params.get("volume"),
        params.get("volume_export", ""),
        params.get("volume_path"),
    )
    if isinstance(path, str) and address is None:
        return VolumeTarget(path=Path(path))
    if not isinstance(address, str) or not isinstance(export, str) or path is not None:
        return (
            "a reconcile needs params.volume (HOST:PORT or unix:PATH) and volume_export, "
            "or volume_path"
        )
    try:
        where: NbdAddress = (
            UnixAddress(Path(address.removeprefix("unix:")))
            if address.startswith("unix:")
            else parse_address(address)
        )
    except ValueError as error:
        return str(error)
    return VolumeTarget(where, export)


def parse_pass(params: Mapping[str, ParamValue]) -> tuple[int, int] | str:
    """(pass number, workers) of a reconcile order, or why its params are wrong."""
    pass_no, workers = params.get("pass"), params.get("workers", DEFAULT_WORKERS)
    if not isinstance(pass_no, int) or isinstance(pass_no, bool) or pass_no < 1:
        return "a reconcile needs params.pass, a pass number from 1"
    if not isinstance(workers, int) or isinstance(workers, bool) or not 1 <= workers <= 64:
        return "params.workers is a number from 1 to 64"
    return pass_no, workers


# -- passes -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReconcileDisk:
    """The disk passes are for, and the lease holder that gives the orders."""

    disk_id: str
    migration_id: str
    token: int
    lease: str


@dataclass(frozen=True, slots=True)
class ReconcileRun:
    passes: tuple[PassResult, ...]
    converged: bool
    """The last pass left at most the threshold to copy."""
    next_pass: int


def reconcile_order(
    disk: ReconcileDisk, volume: VolumeTarget, pass_no: int, workers: int | None = None
) -> Order:
    params = {"pass": pass_no, **volume_params(volume)}
    if workers is not None:
        params["workers"] = workers
    return Order(
        disk.disk_id,
        OrderAction.RECONCILE,
        disk.migration_id,
        disk.token,
        disk.lease,
        params=params,
    )


async def reconcile_pass(
    orders: ComponentOrders,
    disk: ReconcileDisk,
    volume: VolumeTarget,
    pass_no: int,
    *,
    workers: int | None = None,
    timeout_s: float = DEFAULT_PASS_TIMEOUT_S,
) -> PassResult:
    """One pass, given to the cache and waited for.

    Raises ReconcileUnavailable when the cache could not make it for now (retry later
    with the *next* number: the same order again would only find this outcome), and
    ReconcileFailed when it refused it or failed for good; ``give_and_wait``'s own
    errors pass through (LeaseLost, StaleToken, ComponentSilent, OrderRefused).
    """
    order = reconcile_order(disk, volume, pass_no, workers)
    outcome = await orders.give_and_wait(order, timeout_s)
    if outcome.kind is OutcomeKind.FAILED and outcome.retryable:
        raise ReconcileUnavailable(disk.disk_id, pass_no, outcome.reason)
    if outcome.kind is not OutcomeKind.APPLIED:
        raise ReconcileFailed(disk.disk_id, pass_no, outcome.code.value, outcome.reason)
    return PassResult.from_result(dict(outcome.result))


async def reconcile_until(
    orders: ComponentOrders,
    disk: ReconcileDisk,
    volume: VolumeTarget,
    threshold: int,
    max_passes: int,
    *,
    first_pass: int = 1,
    workers: int | None = None,
    timeout_s: float = DEFAULT_PASS_TIMEOUT_S,
    on_pass: Callable[[PassResult], None] | None = None,
) -> ReconcileRun:
    """Passes from ``first_pass`` until one leaves at most ``threshold`` bytes to copy, or
    ``max_passes`` were made. ``on_pass`` sees each pass as it is made (keep its number
    + 1 in the workflow's record). Errors are :func:`reconcile_pass`'s: after a
    ReconcileUnavailable, go on later from its ``pass_no + 1`` (that pass copies what
    the failed one would have, too)."""
    if max_passes < 1 or threshold < 0:
        raise ValueError("max_passes is at least 1 and threshold at least 0")
    passes: list[PassResult] = []
    pass_no = first_pass
    for _ in range(max_passes):
        result = await reconcile_pass(
            orders, disk, volume, pass_no, workers=workers, timeout_s=timeout_s
        )
        passes.append(result)
        pass_no += 1
        if on_pass is not None:
            on_pass(result)
        if result.remainder_bytes <= threshold:
            return ReconcileRun(tuple(passes), converged=True, next_pass=pass_no)
    return ReconcileRun(tuple(passes), converged=False, next_pass=pass_no)


# -- the whole-image check -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImageComparison:
    size: int
    chunk_size: int
    left_digest: bytes
    right_digest: bytes
    first_difference: int | None
    """The offset of the first byte that differs; None when the images are equal."""

    @property
    def equal(self) -> bool:
        return self.first_difference is None


async def compare_images(
    left: Backend,
    right: Backend,
    *,
    chunk_size: int | None = None,
    workers: int = DEFAULT_WORKERS,
    retry: RetryPolicy | None = None,
) -> ImageComparison:
    """Hash every chunk of both (where the data lies when a side can: a Ferry NBD server
    hashes its own blocks) and name the first byte that differs."""
    size = min(left.size, right.size)
    chunk_size = chunk_size or check_chunk_size(size)
    policy, clock = retry or RetryPolicy(), SystemClock()
    tables = (ChunkTable(size, chunk_size), ChunkTable(size, chunk_size))
    async with asyncio.TaskGroup() as group:  # both sides at once
        for backend, table in zip((left, right), tables, strict=True):
            group.create_task(
                hash_image(
                    backend,
                    RangeHasher(backend),
                    table,
                    needed=lambda index: True,
                    workers=workers,
                    policy=policy,
                    clock=clock,
                )
            )
    differs = first_difference(*tables)
    offset: int | None = None
    if differs is not None:
        start, length = tables[0].bounds(differs)
        found = await left.read(start, length), await right.read(start, length)
        offset = start + _first_byte(*found)
    elif left.size != right.size:
        offset = size
    return ImageComparison(
        size, chunk_size, image_digest(tables[0]), image_digest(tables[1]), offset
    )


def _first_byte(left: bytes, right: bytes) -> int:
    return next(
        (at for at, (a, b) in enumerate(zip(left, right, strict=True)) if a != b), len(left)
    )


async def check_volume(
    cache: NbdAddress,
    export: str,
    volume: VolumeTarget,
    *,
    chunk_size: int | None = None,
    workers: int = DEFAULT_WORKERS,
) -> ImageComparison:
    """The cutover's check: the cache's whole image of the disk against the volume's.

    ``export``: the cache's ``image/<disk>`` export (``image`` in the open order's
    result; ``reconcile.image_export``), which hashes what the cache holds in the cache and
    asks on-prem for the rest; the VM's own export works too, but reads everything
    through the cache (and keeps what it fetches)."""
    async with await NbdBackend.connect(cache, export, name=f"cache:{export}") as view:
        target = await volume.connect()
        try:
            comparison = await compare_images(view, target, chunk_size=chunk_size, workers=workers)
        finally:
            await target.close()
    log.info(
        "whole-image check",
        export=export,
        volume=str(volume),
        equal=comparison.equal,
        first_difference=comparison.first_difference,
    )
    return comparison


@dataclass(frozen=True, slots=True)
class Cutover:
    last: PassResult
    check: ImageComparison


async def cutover_pass(
    orders: ComponentOrders,
    disk: ReconcileDisk,
    volume: VolumeTarget,
    pass_no: int,
    *,
    cache: NbdAddress,
    image: str,
    timeout_s: float = DEFAULT_PASS_TIMEOUT_S,
) -> Cutover:
    """The cutover's data part, with the cloud VM powered off: the last pass, then the
    whole-image check of the cache's view (``image``) against the volume. Raises
    CertificationFailed (the first differing byte) rather than let the VM power on over
    a volume that differs; :func:`reconcile_pass`'s errors pass through."""
    last = await reconcile_pass(orders, disk, volume, pass_no, timeout_s=timeout_s)
    check = await check_volume(cache, image, volume)
    if check.first_difference is not None:
        raise CertificationFailed(check.first_difference, 1)
    return Cutover(last, check)
