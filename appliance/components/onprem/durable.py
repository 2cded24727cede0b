"""Blocking helpers that make files durable; run them in a worker thread.

``atomic_write`` replaces a file so that a crash leaves either the old or
the new content, never a mix: write a temporary file, fsync it, rename it
over the old one, fsync the directory (the rename itself is metadata).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


def save_json(path: Path, record: dict[str, Any]) -> None:
    """``record`` as JSON at ``path``, atomically, its directory made first if missing."""
    make_dirs(path.parent)
    atomic_write(path, json.dumps(record, sort_keys=True).encode())


def load_token(path: Path) -> int:
    """The token saved at ``path`` by ``save_json(path, {"token": n})``; 0 if none."""
    try:
        token = json.loads(path.read_text())["token"]
    except FileNotFoundError:
        return 0
    if not isinstance(token, int):
        raise ValueError(f"{path} holds no integer token")
    return token
