"""``DirectEpochSink``: the cache's ``EpochSink`` implemented by an on-prem I/O manager.

    sink = DirectEpochSink(manager, via=proxy_address)
    # stage(): manager.stage_export(); the address is replaced by ``via`` (a fault
    #          proxy standing for the WAN link), so the epoch's bytes cross it
    # commit(): manager.commit_epoch() with the manifest in the on-prem type

``manager`` is an ``OnpremIoManager`` in this process or anything with the
same two methods (``component_hosts.RpcOnprem`` reaches one in another
process). Errors pass through with their types: an epoch the manager has
committed already is ``EpochOutOfOrder`` from ``stage`` (the cache's shipper
then skips the copy and replays the commit).
"""

from __future__ import annotations

from typing import Protocol

from appliance.components.cache import shipping
from appliance.components.onprem import EpochManifest, ManifestEntry
from appliance.datapath.nbd.channel import NbdAddress
from appliance.errors import EpochOutOfOrder


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
    def __init__(self, manager: OnpremEpochs, *, via: NbdAddress | None = None) -> None:
        self._manager = manager
        self._via = via
        self.already_committed: list[tuple[str, int]] = []
        """(disk, epoch) staged again after the manager had committed it."""

    async def stage(self, disk_id: str, epoch: int, token: int) -> tuple[NbdAddress, str]:
        try:
            address, export = await self._manager.stage_export(disk_id, epoch, token)
        except EpochOutOfOrder as refused:
            if refused.expected > epoch:
                self.already_committed.append((disk_id, epoch))
            raise
        return self._via or address, export

    async def commit(
        self, disk_id: str, epoch: int, token: int, manifest: shipping.EpochManifest
    ) -> None:
        await self._manager.commit_epoch(disk_id, epoch, token, onprem_manifest(manifest))
