"""The manifest of a layered disk: its size, granularity, layers, snapshots and pending work.

Layers are named by number only (``base.raw``, ``overlay-000003.raw``), so
no name from outside, such as a snapshot name, ever becomes a path. Snapshot
``i`` freezes layer ``i``: the disk as it was is layers ``0..i``. A pending
merge or consolidation is recorded before any layer is changed and finished
on the next open, so a crash in the middle never leaves a half-merged disk.

A layer no snapshot freezes, below the top, is a *linked* one: a staged file
made a layer whole (``LayeredDisk.link_layer``; the on-prem I/O manager's
epochs). ``last_link`` names the staged file last linked, so that linking it
again after a crash is recognised and does nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from appliance.errors import DiskCorrupt
from appliance.storage.bitmap import write_atomically

FORMAT = 1
MANIFEST_NAME = "manifest.json"
LOCK_NAME = "lock"
BASE_LAYER = 0


def data_file_name(layer: int) -> str:
    return "base.raw" if layer == BASE_LAYER else f"overlay-{layer:06d}.raw"


def bitmap_file_name(layer: int) -> str:
    """The base keeps the blocks zeroed without punching; an overlay, the blocks written."""
    return "base.zeroed" if layer == BASE_LAYER else f"overlay-{layer:06d}.bitmap"


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """A point in time of a disk; ``id`` is what every other call takes."""

    id: str
    name: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class SnapshotRecord:
    info: SnapshotInfo
    layer: int


@dataclass(frozen=True, slots=True)
class PendingMerge:
    """Layer ``upper`` is being folded into ``lower`` (a snapshot was deleted)."""

    upper: int
    lower: int


@dataclass(frozen=True, slots=True)
class PendingConsolidation:
    """Every overlay is being folded into the base."""


Pending = PendingMerge | PendingConsolidation | None


@dataclass(frozen=True, slots=True)
class Manifest:
    size: int
    granularity: int
    next_layer: int
    layers: tuple[int, ...] = (BASE_LAYER,)
    snapshots: tuple[SnapshotRecord, ...] = ()
    pending: Pending = field(default=None)
    last_link: str | None = None
    """The name of the staged file last linked as a layer (see ``LayeredDisk.link_layer``)."""

    def to_json(self) -> bytes:
        document: dict[str, Any] = {
            "format": FORMAT,
            "size": self.size,
            "granularity": self.granularity,
            "next_layer": self.next_layer,
            "layers": list(self.layers),
            "snapshots": [
                {
                    "id": record.info.id,
                    "name": record.info.name,
                    "created_at": record.info.created_at.isoformat(),
                    "layer": record.layer,
                }
                for record in self.snapshots
            ],
            "pending": _pending_to_json(self.pending),
        }
        if self.last_link is not None:
            document["last_link"] = self.last_link
        return json.dumps(document, indent=1).encode() + b"\n"


def _pending_to_json(pending: Pending) -> dict[str, Any] | None:
    if isinstance(pending, PendingMerge):
        return {"kind": "merge", "upper": pending.upper, "lower": pending.lower}
    if isinstance(pending, PendingConsolidation):
        return {"kind": "consolidate"}
    return None


def _pending_from_json(document: dict[str, Any] | None) -> Pending:
    if document is None:
        return None
    if document["kind"] == "merge":
        return PendingMerge(upper=int(document["upper"]), lower=int(document["lower"]))
    if document["kind"] == "consolidate":
        return PendingConsolidation()
    raise ValueError(f"unknown pending operation {document['kind']!r}")


def _parse(document: dict[str, Any]) -> Manifest:
    if document.get("format") != FORMAT:
        raise ValueError(f"format {document.get('format')!r}, expected {FORMAT}")
    snapshots = tuple(
        SnapshotRecord(
            SnapshotInfo(
                id=str(item["id"]),
                name=str(item["name"]),
                created_at=datetime.fromisoformat(item["created_at"]),
            ),
            layer=int(item["layer"]),
        )
        for item in document["snapshots"]
    )
    return Manifest(
        size=int(document["size"]),
        granularity=int(document["granularity"]),
        next_layer=int(document["next_layer"]),
        layers=tuple(int(layer) for layer in document["layers"]),
        snapshots=snapshots,
        pending=_pending_from_json(document["pending"]),
        last_link=None if document.get("last_link") is None else str(document["last_link"]),
    )


def _adjacent(layers: tuple[int, ...], lower: int, upper: int) -> bool:
    return lower in layers and upper in layers and layers.index(upper) == layers.index(lower) + 1


def check(manifest: Manifest) -> str | None:
    """What is wrong with a manifest's structure, or None."""
    layers = manifest.layers
    if manifest.size < 0 or not layers or layers[0] != BASE_LAYER:
        return "the first layer must be the base"
    if len(set(layers)) != len(layers) or max(layers) >= manifest.next_layer:
        return "layer numbers must be unique and below next_layer"
    positions = [layers.index(r.layer) if r.layer in layers else -1 for r in manifest.snapshots]
    if any(p < 0 or p == len(layers) - 1 for p in positions) or positions != sorted(set(positions)):
        return "each snapshot must freeze a distinct layer below the top, in order"
    ids = [record.info.id for record in manifest.snapshots]
    if len(set(ids)) != len(ids):
        return "snapshot ids must be unique"
    pending = manifest.pending
    if isinstance(pending, PendingMerge) and not _adjacent(layers, pending.lower, pending.upper):
        return "a pending merge must join two adjacent layers"
    return None


def load(directory: Path) -> Manifest:
    path = directory / MANIFEST_NAME
    try:
        manifest = _parse(json.loads(path.read_bytes()))
    except FileNotFoundError as error:
        raise DiskCorrupt(path, "manifest is missing") from error
    except (ValueError, KeyError, TypeError) as error:
        raise DiskCorrupt(path, f"manifest is unreadable: {error}") from error
    problem = check(manifest)
    if problem is not None:
        raise DiskCorrupt(path, problem)
    return manifest


def save(directory: Path, manifest: Manifest) -> None:
    problem = check(manifest)
    if problem is not None:
        raise ValueError(f"refusing to write a bad manifest: {problem}")
    write_atomically(directory / MANIFEST_NAME, manifest.to_json())
