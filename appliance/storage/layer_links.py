"""A layered disk's linked layers: staged files made layers without a copy, and compaction.

``StagedLayers`` is a part of :class:`~appliance.storage.layered.LayeredDisk`
(a base class that holds this half of its work; the attributes and methods
declared under ``TYPE_CHECKING`` are the disk's own). Someone else writes a
*staged* file in the disk's directory (``staged_path``), then ``link_layer``
makes it the new top layer: filled where its blocks are covered only in
part, hard-linked under a layer's name beside its bitmap (``PREPARED``), then
named by the manifest, which also records the staged file's name so that a
second link of it (a replay after a crash) does nothing (``LINKED``); the
staged name is removed last. A crash before the manifest names the layer
leaves the disk as it was (the layer's name is a stray, removed on open; the
staged name still holds the bytes); after, as it will be.

Layers that no snapshot freezes pile up, one per link: ``compact`` folds
each into the layer below (an empty one is just dropped) while I/O goes on,
and holds I/O back only to swap the manifest.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from appliance.storage import layer_files
from appliance.storage.disk_manifest import Manifest, SnapshotRecord
from appliance.storage.layer_files import Layer, OpenFiles
from appliance.storage.layer_map import Geometry
from appliance.storage.locks import SharedExclusiveLock

_T = TypeVar("_T")

FOLD_PIECE = 64 << 20
"""``compact`` copies about this many bytes per piece, letting I/O and close in between."""


class LinkStep(enum.StrEnum):
    PREPARED = "prepared"
    """The staged file is filled, durable and hard-linked beside its bitmap; not named."""
    LINKED = "linked"
    """The manifest names it; the staged name is not removed yet."""
    FOLDED_PART = "folded_part"
    """``compact``: one piece of an upper layer copied into the lower one."""
    FOLDED = "folded"
    """``compact``: a lower layer holds an upper one's blocks, durably; not yet dropped."""


Checkpoint = Callable[[LinkStep], Awaitable[None]]
"""Called after a step of ``link_layer`` or ``compact`` (tests stop them there)."""


class StagedLayers:
    """Linking staged files and compacting, for :class:`LayeredDisk` (see the module)."""

    if TYPE_CHECKING:
        _directory: Path
        _geometry: Geometry
        _gate: SharedExclusiveLock
        _layers: list[Layer]
        _snapshots: list[SnapshotRecord]
        _files: OpenFiles
        _next_layer: int
        _last_link: str | None
        _compacting: asyncio.Lock
        _closing: bool

        @property
        def name(self) -> str: ...

        @property
        def granularity(self) -> int: ...

        async def _guarded(self, work: Coroutine[Any, Any, _T]) -> _T: ...

        def _check_open(self) -> None: ...

        def _manifest(self, **changes: Any) -> Manifest: ...

        async def _save_manifest(self, manifest: Manifest) -> None: ...

        async def _save_bitmap(self, layer: Layer) -> None: ...

        async def _flush_top(self) -> None: ...

        async def _drop(self, layers: list[Layer]) -> None: ...

    def staged_path(self) -> Path:
        """A new name, in the disk's directory, for a file to stage and later link."""
        return self._directory / layer_files.staged_name()

    async def discard_staged(self) -> None:
        """Remove every staged file (their owner has none it still needs)."""
        found = await asyncio.to_thread(layer_files.staged_files, self._directory)
        await asyncio.to_thread(layer_files.remove_staged, self._directory, found)

    async def link_layer(
        self,
        staged: Path,
        extents: Sequence[tuple[int, int]],
        checkpoint: Checkpoint | None = None,
    ) -> bool:
        """Make ``staged`` (from ``staged_path``, every write to it finished) the new top
        layer, owning the blocks that the byte ranges ``(offset, length)`` touch; the
        rest of a partly covered block is filled from the disk as it is. Nothing is copied
        but those edges. Crash-safe and idempotent: False if ``staged`` was the file last
        linked (its name is then removed if a crash left it)."""
        if not layer_files.is_staged(self._directory, staged):
            raise ValueError(f"{staged} is not a staged file of {self.name}")
        return await self._guarded(self._link_now(staged, list(extents), checkpoint))

    async def compact(self, checkpoint: Checkpoint | None = None) -> int:
        """Fold layers that no snapshot freezes into the one below, until none is left but
        the top; the number of layers removed. An empty one is dropped; otherwise the upper
        layer's blocks are copied down (``FOLD_PIECE`` at a time, reads and writes going on:
        neither layer is the top, the lower one ends no view, so every view reads the same
        throughout), the lower's bitmap saved, then the manifest swapped. A crash anywhere
        leaves both layers named and reading as before; the next compaction does it again.
        Stops between pieces when the disk is being closed."""
        return await self._guarded(self._compact_now(checkpoint))

    async def _link_now(
        self, staged: Path, extents: list[tuple[int, int]], checkpoint: Checkpoint | None
    ) -> bool:
        async with self._gate.exclusive():
            self._check_open()
            if self._last_link == staged.name:
                await asyncio.to_thread(layer_files.remove_staged, self._directory, [staged])
                return False
            await self._flush_top()  # the layer that stops taking writes is durable first
            number = self._next_layer
            layer = await asyncio.to_thread(
                layer_files.link_staged,
                self._directory,
                staged,
                number,
                self._geometry,
                list(self._layers),
                extents,
                self._files,
            )
            try:
                if checkpoint is not None:
                    await checkpoint(LinkStep.PREPARED)
                manifest = self._manifest(
                    next_layer=number + 1,
                    layers=(*(layer.number for layer in self._layers), number),
                    last_link=staged.name,
                )
                await self._save_manifest(manifest)
            except BaseException:
                self._files.close(layer.fd)  # its files are strays until linked again
                raise
            self._next_layer, self._last_link = number + 1, staged.name
            self._layers.append(layer)
            if checkpoint is not None:
                await checkpoint(LinkStep.LINKED)
            await asyncio.to_thread(layer_files.remove_staged, self._directory, [staged])
            return True

    def _foldable(self) -> tuple[Layer, Layer] | None:
        """The first (lower, upper) pair that ``compact`` can join: the lower frozen by no
        snapshot, and either empty (not the base) or below an upper that is not the top."""
        frozen = {record.layer for record in self._snapshots}
        for index in range(1, len(self._layers)):
            lower, upper = self._layers[index - 1], self._layers[index]
            if lower.number in frozen:
                continue
            if not lower.is_base and not lower.bitmap.count():
                return lower, upper
            if index < len(self._layers) - 1:
                return lower, upper
        return None

    async def _compact_now(self, checkpoint: Checkpoint | None) -> int:
        removed = 0
        async with self._compacting:
            while not self._closing and (pair := self._foldable()) is not None:
                lower, upper = pair
                if lower.is_base or lower.bitmap.count():
                    if not await self._fold_pieces(upper, lower, checkpoint):
                        break
                    if checkpoint is not None:
                        await checkpoint(LinkStep.FOLDED)
                    await self._drop_folded(upper, lower)
                else:
                    await self._drop_folded(lower, None)
                removed += 1
        return removed

    async def _fold_pieces(self, upper: Layer, lower: Layer, checkpoint: Checkpoint | None) -> bool:
        """Copy ``upper``'s blocks into ``lower`` a piece at a time, then save ``lower``'s
        bitmap (its data is durable first); False if the disk began closing meanwhile."""
        zeroed: list[tuple[int, int]] = []
        per_piece = max(1, FOLD_PIECE // self.granularity)
        for first, stop in upper.bitmap.runs():
            for start in range(first, stop, per_piece):
                if self._closing:
                    return False
                run = (start, min(stop, start + per_piece))
                async with self._gate.shared():
                    self._check_open()
                    zeroed += await asyncio.to_thread(
                        layer_files.fold, self._geometry, [(upper, [run])], lower
                    )
                if checkpoint is not None:
                    await checkpoint(LinkStep.FOLDED_PART)
        async with self._gate.exclusive():
            self._check_open()
            if lower.is_base:
                for run in zeroed:
                    lower.bitmap.set_range(*run)
            else:
                lower.bitmap.update(upper.bitmap)
            await self._save_bitmap(lower)
        return True

    async def _drop_folded(self, gone: Layer, into: Layer | None) -> None:
        """Name ``gone`` no more (its snapshots now freeze ``into``), then remove its files."""
        async with self._gate.exclusive():
            self._check_open()
            self._layers.remove(gone)
            if into is not None:
                self._snapshots = [
                    replace(record, layer=into.number) if record.layer == gone.number else record
                    for record in self._snapshots
                ]
            await self._save_manifest(self._manifest())
            await self._drop([gone])
