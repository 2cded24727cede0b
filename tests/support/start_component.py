"""A repair command for tests: starts one component process, in its own session, and exits.

    python tests/support/start_component.py CONFIG KIND NAME

``CONFIG`` (JSON) maps ``KIND/NAME`` to how that component starts: ``argv``, ``env``,
``cwd`` and ``log`` (its output, appended). Prints the new process's pid.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def main(config_path: str, kind: str, name: str) -> int:
    entry = json.loads(Path(config_path).read_text())[f"{kind}/{name}"]
    with open(entry["log"], "ab") as log:
        process = subprocess.Popen(
            entry["argv"],
            env=entry["env"],
            cwd=entry["cwd"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    print(f"started {kind}/{name} as pid {process.pid}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
