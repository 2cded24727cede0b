"""The appliance's key pair on disk: created on first start, 0600, never overwritten.

``{data_dir}/appliance-key.json`` holds the Ed25519 seed and the X25519 secret
(see :mod:`messages.keys`). It is written to a temporary file opened 0600 and
hard-linked into place, so a reader never sees half a file and two processes
starting at once end up with the same key (the second link fails; it reads the
first). Several appliance processes that share a queue share this file.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

from appliance.errors import KeyFileError
from messages.keys import ApplianceKeyPair, KeyFormatError

KEY_FILE = "appliance-key.json"


def key_path(data_dir: Path) -> Path:
    return data_dir / KEY_FILE


def load_or_create(data_dir: Path) -> ApplianceKeyPair:
    """The key pair in ``data_dir``, made (0600, atomically) if there is none yet."""
    path = key_path(data_dir)
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        _create(path, ApplianceKeyPair.generate())
    return load(path)


def load(path: Path) -> ApplianceKeyPair:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise KeyFileError(path, f"is readable by others (mode {mode:o}); chmod 600 it")
        return ApplianceKeyPair.from_json(path.read_text())
    except OSError as error:
        raise KeyFileError(path, error.strerror or type(error).__name__) from None
    except KeyFormatError as error:
        raise KeyFileError(path, str(error)) from None


def _create(path: Path, pair: ApplianceKeyPair) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(pair.to_json())
            file.flush()
            os.fsync(file.fileno())
        with contextlib.suppress(FileExistsError):  # another process made one first: use it
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
