"""Blocking helpers that make files durable; run them in a worker thread.

``atomic_write`` replaces a file so that a crash leaves either the old or
the new content, never a mix: write a temporary file, fsync it, rename it
over the old one, fsync the directory (the rename itself is metadata).
"""

from __future__ import annotations

from pathlib import Path

from appliance.storage.bitmap import fsync_directory, write_atomically

# The storage layer already makes files durable this way (bitmaps): one implementation.
fsync_dir = fsync_directory
atomic_write = write_atomically


def make_dirs(directory: Path) -> None:
    """Create ``directory`` and its missing parents, each made durable in its parent."""
    missing: list[Path] = []
    current = directory
    while not current.exists():
        missing.append(current)
        current = current.parent
    for created in reversed(missing):
        created.mkdir(mode=0o700, exist_ok=True)
        fsync_dir(created.parent)
