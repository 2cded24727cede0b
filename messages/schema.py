"""JSON Schema files for every message, generated from the models.

python -m messages.schema --write    regenerate messages/schema/*.json
python -m messages.schema --check    exit 1 if the checked-in files are stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from messages.codec import MESSAGE_TYPES
from messages.envelope import SCHEMA_VERSION

SCHEMA_DIR = Path(__file__).parent / "schema"


def rendered() -> dict[str, str]:
    """File name to file text, for every message type."""
    files = {}
    for message_type, cls in sorted(MESSAGE_TYPES.items()):
        schema = cls.model_json_schema(mode="validation")
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"https://ferry.dev/schema/{SCHEMA_VERSION}/{message_type}.json"
        schema["x-ferry-kind"] = cls.KIND
        files[f"{message_type}.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return files


def stale_files(directory: Path = SCHEMA_DIR) -> list[str]:
    """Names of schema files that are missing, different, or no longer generated."""
    expected = rendered()
    stale = [
        name
        for name, text in expected.items()
        if not (directory / name).is_file() or (directory / name).read_text() != text
    ]
    stale += [path.name for path in directory.glob("*.json") if path.name not in expected]
    return sorted(stale)


def write(directory: Path = SCHEMA_DIR) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    expected = rendered()
    for path in directory.glob("*.json"):
        if path.name not in expected:
            path.unlink()
    for name, text in expected.items():
        (directory / name).write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", action="store_true")
    group.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    if args.write:
        write()
        return 0
    stale = stale_files()
    if stale:
        print("stale schema files (run make schema): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
