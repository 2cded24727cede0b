"""``DirectEpochSink``: the cache's ``EpochSink`` implemented by an on-prem I/O manager.

    sink = DirectEpochSink(manager, size=disk_size, via=proxy_address)
    # stage(): manager.stage_export(); the address is replaced by ``via`` (a fault
    #          proxy standing for the WAN link), so the epoch's bytes cross it
    # commit(): manager.commit_epoch() with the manifest in the on-prem type

``manager`` is an ``OnpremIoManager`` in this process or anything with the
same two methods (``component_hosts.RpcOnprem`` reaches one in another
process).

An epoch the manager has already committed (its commit reply was lost to a
crash of either side, so the cache ships it again) is refused by
``stage_export`` with ``EpochOutOfOrder``. The sink then hands out a throwaway
export of its own for the re-sent bytes, and the commit that follows is the
manager's idempotent replay (a no-op for the same manifest digest).
"""

from __future__ import annotations

from typing import Protocol

from appliance.components.cache import shipping
from appliance.components.onprem import EpochManifest, ManifestEntry
from appliance.datapath.nbd.channel import NbdAddress, TcpAddress
from appliance.datapath.nbd.server import NbdServer
from appliance.errors import EpochOutOfOrder
from appliance.storage.memory import MemoryBackend


class OnpremEpochs(Protocol):
    async def stage_export(self, disk_id: str, epoch: int, token: int) -> tuple[NbdAddress, str]:
        """A writable export where ``epoch`` lands."""
        ...

    async def commit_epoch(
        self, disk_id: str, epoch: int, token: int, manifest: EpochManifest
    ) -> None:
        """Verify, record and apply ``epoch``; a replay is a no-op."""
        ...


def onprem_manifest(manifest: shipping.EpochManifest) -> EpochManifest:
    """The cache's manifest in the I/O manager's type (same entries, same digest rule)."""
    converted = EpochManifest.build(
        ManifestEntry(entry.offset, entry.length, entry.digest) for entry in manifest.entries
    )
    if converted.digest != manifest.digest:
        raise ValueError("the cache's and the I/O manager's epoch digests disagree")
    return converted


class DirectEpochSink:
    def __init__(self, manager: OnpremEpochs, *, size: int, via: NbdAddress | None = None) -> None:
        self._manager = manager
        self._size = size
        self._via = via
        self._discard: NbdServer | None = None
        self.resent: list[tuple[str, int]] = []
        """(disk, epoch) shipped again after the manager had committed it."""

    async def stage(self, disk_id: str, epoch: int, token: int) -> tuple[NbdAddress, str]:
        try:
            address, export = await self._manager.stage_export(disk_id, epoch, token)
        except EpochOutOfOrder as refused:
            if refused.expected <= epoch:
                raise
            return await self._throwaway(disk_id, epoch)
        return self._via or address, export

    async def commit(
        self, disk_id: str, epoch: int, token: int, manifest: shipping.EpochManifest
    ) -> None:
        await self._manager.commit_epoch(disk_id, epoch, token, onprem_manifest(manifest))
        if self._discard is not None:
            self._discard.remove_export(_throwaway_name(disk_id, epoch))

    async def close(self) -> None:
        if self._discard is not None:
            await self._discard.stop()
            self._discard = None

    async def _throwaway(self, disk_id: str, epoch: int) -> tuple[NbdAddress, str]:
        if self._discard is None:
            self._discard = NbdServer(address=TcpAddress("127.0.0.1", 0))
            await self._discard.start()
        name = _throwaway_name(disk_id, epoch)
        if name not in self._discard.exports:
            self._discard.add_export(name, MemoryBackend(self._size, name=name))
            self.resent.append((disk_id, epoch))
        return self._discard.address, name


def _throwaway_name(disk_id: str, epoch: int) -> str:
    return f"committed/{disk_id}/{epoch}"
