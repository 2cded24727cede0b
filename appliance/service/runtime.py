"""runtime.json: where a running appliance can be reached, and its public key (never a secret).

A ``ferry --runtime`` on the same machine pins ``appliance_key`` from here: the
file is the appliance's own, in its data directory.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

RUNTIME_FILE = "runtime.json"


@dataclass(frozen=True, slots=True)
class RuntimeInfo:
    appliance_id: str
    pid: int
    started_at: str
    sqs_endpoint: str | None
    region: str
    command_queue_url: str
    response_queue_url: str
    dead_letter_queue_url: str
    redis_embedded: bool
    appliance_key: str
    metrics_address: str | None = None
    """HOST:PORT of GET /metrics (FERRY_METRICS_BIND), None when off."""


def write_runtime(data_dir: Path, info: RuntimeInfo) -> Path:
    path = data_dir / RUNTIME_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(info), indent=2))
    os.replace(tmp, path)
    return path


def clear_runtime(data_dir: Path, pid: int) -> None:
    """Remove runtime.json if it is still ours."""
    path = data_dir / RUNTIME_FILE
    try:
        if json.loads(path.read_text()).get("pid") == pid:
            path.unlink()
    except (OSError, ValueError):
        pass
