"""Offline bulk packages: a manifest plus one hashed object per data chunk (DESIGN.md §5).

See README.md in this directory for the format, and export.py / importing.py for
the two halves.
"""

from appliance.datapath.package.export import (
    ExportCounters,
    ExportDisk,
    ExportOptions,
    ExportResult,
    export_package,
)
from appliance.datapath.package.importing import (
    ImportCounters,
    ImportOptions,
    ImportResult,
    import_package,
    load_manifest,
)
from appliance.datapath.package.manifest import MANIFEST_NAME, Manifest
from appliance.datapath.package.store import PackageStore, S3Access, open_store
from appliance.datapath.package.verify import VerifyReport, verify_package

__all__ = [
    "MANIFEST_NAME",
    "ExportCounters",
    "ExportDisk",
    "ExportOptions",
    "ExportResult",
    "ImportCounters",
    "ImportOptions",
    "ImportResult",
    "Manifest",
    "PackageStore",
    "S3Access",
    "VerifyReport",
    "export_package",
    "import_package",
    "load_manifest",
    "open_store",
    "verify_package",
]
