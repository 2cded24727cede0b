"""Committing one flush epoch to a disk, in an order a crash cannot break.

An epoch lands in a *staged file* in the disk's own directory (see
``staging``; ``LayeredDisk.staged_path``), so committing it needs no copy:
the file becomes a layer of the disk. The steps, each finished (and durable
where it says so) before the next:

1. *verify*: nothing landed outside the manifest; every entry's staged
   bytes hash to the entry's hash, known from the hashes taken as they
   landed where those cover the entry exactly, else read back and hashed
   (``CommitStep.VERIFIED``);
2. *staging durable*: fdatasync the staged data, fsync its landing records
   (``STAGING_DURABLE``);
3. *commit record* appended to the disk's journal and fsynced
   (``COMMIT_RECORDED``): from here on the epoch *is* committed;
4. *link* (``LayeredDisk.link_layer``): the disk's top layer flushed; the
   staged file's blocks that the manifest covers only in part filled from
   the disk as it is, the file fdatasynced and hard-linked under a new
   layer's name beside a bitmap of the blocks the manifest covers
   (``LAYER_PREPARED``); the disk's manifest then names it as the new top
   layer and records the staged file's name as the one last linked
   (``LAYER_LINKED``): reads of the current image go through it from now
   on; the staged name removed (``APPLIED``);
5. *applied record* appended and fsynced (``APPLIED_RECORDED``);
6. the staging area (its landing records) dropped (``STAGING_DROPPED``).

After the reply, layers that no snapshot freezes are folded together in the
background (``LayeredDisk.compact``: the epoch before this one into the
layer below it; every view reads the same throughout), so a disk in a long
try-before-commit keeps a short chain.

A crash before 3 leaves the epoch uncommitted: its staging is discarded on
the next open and the disk was never touched. A crash after 3 leaves it
committed: the next open links it again from the staged file, which is
kept until the disk's manifest names it; a link of the file last linked is
recognised by its name and does nothing, so doing it twice is doing it
once. The disk itself is never a mix: before the manifest names the layer
it reads as before the epoch, after as after it (a layer file not named is
a stray, removed on open; the staged name still holds the bytes). Either
way the disk ends with epoch N wholly applied or not at all.

The staged bytes are not read again after step 1: they were hashed as they
landed (or read back at verify), and from the link on they are the disk's
own, as safe at rest as any other layer.

A :data:`CommitHook` is called after each step; tests use it to stop a
commit there (raise, or block while the process is killed).
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from pathlib import Path

from appliance.components.onprem.manifest import EpochManifest
from appliance.storage.layered import LayeredDisk, LinkStep


class CommitStep(enum.StrEnum):
    VERIFIED = "verified"
    STAGING_DURABLE = "staging_durable"
    COMMIT_RECORDED = "commit_recorded"
    LAYER_PREPARED = "layer_prepared"
    LAYER_LINKED = "layer_linked"
    APPLIED = "applied"
    APPLIED_RECORDED = "applied_recorded"
    STAGING_DROPPED = "staging_dropped"


CommitHook = Callable[[str, int, CommitStep], Awaitable[None]]
"""Called with (disk_id, epoch, step) after each step of a commit."""

_LINK_STEPS = {
    LinkStep.PREPARED: CommitStep.LAYER_PREPARED,
    LinkStep.LINKED: CommitStep.LAYER_LINKED,
}


async def apply_epoch(
    disk: LayeredDisk,
    staged: Path | None,
    manifest: EpochManifest,
    checkpoint: Callable[[CommitStep], Awaitable[None]] | None = None,
) -> bool:
    """Step 4: the epoch's staged file linked as the disk's new top layer (an epoch
    without entries changes nothing); False if it was linked before (a replay)."""
    linked = False
    if manifest.entries:
        if staged is None:
            raise ValueError("an epoch with entries needs its staged file")
        extents = [(entry.offset, entry.length) for entry in manifest.entries]

        async def step(at: LinkStep) -> None:
            if checkpoint is not None and at in _LINK_STEPS:
                await checkpoint(_LINK_STEPS[at])

        linked = await disk.link_layer(staged, extents, step if checkpoint else None)
    if checkpoint is not None:
        await checkpoint(CommitStep.APPLIED)
    return linked
