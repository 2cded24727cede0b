"""The on-prem I/O manager: NBD exports of disks in migration, epochs committed atomically.

Modules: ``manager`` (:class:`OnpremIoManager`, orders, status), ``staging``
(where an epoch lands), ``commit`` (the commit steps: verify, record, link),
``journal`` (the per-disk epoch journal), ``manifest`` (what an epoch
holds), ``durable`` (atomic writes). Formats are described in each module
and in ``appliance/components/README.md``.
"""

from appliance.components.onprem.commit import CommitHook, CommitStep
from appliance.components.onprem.journal import JournalState, read_journal
from appliance.components.onprem.manager import (
    OnpremDiskOrder,
    OnpremDiskStatus,
    OnpremIoManager,
    OnpremStatus,
    current_export,
    snapshot_export,
    staging_export,
)
from appliance.components.onprem.manifest import EpochManifest, ManifestEntry, epoch_digest
from appliance.components.onprem.staging import StagingBackend

__all__ = [
    "CommitHook",
    "CommitStep",
    "EpochManifest",
    "JournalState",
    "ManifestEntry",
    "OnpremDiskOrder",
    "OnpremDiskStatus",
    "OnpremIoManager",
    "OnpremStatus",
    "StagingBackend",
    "current_export",
    "epoch_digest",
    "read_journal",
    "snapshot_export",
    "staging_export",
]
